//! The MLS KeyPackage directory (`spec/groups.md` §4): devices upload one-time and last-resort
//! KeyPackages, others claim one per device to add it to a group. The server checks what it can
//! (the KeyPackage verifies, its leaf is the uploading device with its signing key, its lifetime)
//! and hands out each one-time KeyPackage at most once; clients check every KeyPackage against
//! the owner's signed device list again, since they must not trust the server.

use super::Json;
use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::{Error, Result};
use crate::storage::{DevicePk, KeyPackageUpload, NewKeyPackage, StoreError};
use axum::extract::State;
use parley_crypto::identity::verify_device_keys;
use parley_crypto::mls::{ErrorKind, KeyPackage};
use parley_crypto::PublicKey;
use parley_spec::error::DeviceRef;
use parley_spec::v1::keypackages::{
    ClaimKeyPackagesRequest, ClaimKeyPackagesResponse, ClaimedKeyPackage, UploadKeyPackagesRequest, UploadKeyPackagesResponse,
    MAX_KEYPACKAGES_PER_UPLOAD,
};
use parley_spec::v1::keys::{DeviceKeys, MAX_CLAIM_DEVICES};
use parley_spec::{DeviceId, ErrorCode, ServerName, Timestamp, UserId};
use std::time::Instant;

fn bad_keypackage(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::BadKeypackage, message)
}

/// Whose KeyPackages an upload may hold, and until when they may live.
struct Expected<'a> {
    user: &'a UserId,
    device: &'a DeviceId,
    signing_key: PublicKey,
    /// Now, in seconds since the Unix epoch (KeyPackage lifetimes count in seconds).
    now_secs: u64,
    /// The latest `not_after` accepted.
    latest_end_secs: u64,
}

impl Expected<'_> {
    /// Parses and checks one uploaded KeyPackage; `name` names it in the error message.
    fn check(&self, name: &str, bytes: &[u8], last_resort: bool) -> Result<NewKeyPackage> {
        let key_package = KeyPackage::from_bytes(bytes).map_err(|e| match e.kind() {
            ErrorKind::BadInput => bad_keypackage(format!("{name}: {e}")),
            ErrorKind::Misuse => Error::internal(e),
        })?;
        key_package
            .leaf()
            .check(self.user, self.device, &self.signing_key)
            .map_err(|e| bad_keypackage(format!("{name}: {e}")))?;
        match (key_package.is_last_resort(), last_resort) {
            (true, false) => {
                return Err(bad_keypackage(format!("{name}: a one-time KeyPackage carries the last_resort extension")))
            }
            (false, true) => return Err(bad_keypackage(format!("{name}: lacks the last_resort extension"))),
            _ => {}
        }
        let lifetime = key_package.lifetime();
        if lifetime.not_before > self.now_secs || lifetime.not_after < self.now_secs {
            return Err(bad_keypackage(format!("{name}: its lifetime is not current")));
        }
        if lifetime.not_after > self.latest_end_secs {
            return Err(bad_keypackage(format!("{name}: its lifetime ends too late (limits.max_keypackage_lifetime_ms)")));
        }
        Ok(NewKeyPackage {
            reference: key_package.reference().to_vec(),
            bytes: key_package.to_bytes().to_vec(),
            expires: Timestamp::from_millis(lifetime.not_after.saturating_mul(1000)),
        })
    }
}

/// POST /v1/keypackages
pub async fn upload_keypackages(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<UploadKeyPackagesRequest>,
) -> Result<axum::Json<UploadKeyPackagesResponse>> {
    if request.key_packages.len() > MAX_KEYPACKAGES_PER_UPLOAD {
        return Err(Error::new(ErrorCode::BadRequest, format!("at most {MAX_KEYPACKAGES_PER_UPLOAD} KeyPackages per upload")));
    }
    let Some(json) = state.store.stored_device_keys(auth.device_pk).await? else {
        return Err(Error::new(ErrorCode::BadRequest, "upload device_keys (POST /v1/keys/upload) before KeyPackages"));
    };
    // Verified when uploaded: a stored copy that fails now is a server fault.
    let device_keys: DeviceKeys = serde_json::from_slice(&json).map_err(Error::internal)?;
    let signing_key = *verify_device_keys(&device_keys).map_err(Error::internal)?.device().signing_key();
    let now_ms = Timestamp::now().as_millis();
    let max_lifetime_ms = state.config.limits.max_keypackage_lifetime_ms;
    let (user, device) = (auth.user_id.clone(), auth.device_id.clone());
    // Each KeyPackage costs a few signature checks: off the async workers.
    let upload = tokio::task::spawn_blocking(move || {
        let expected = Expected {
            user: &user,
            device: &device,
            signing_key,
            now_secs: now_ms / 1000,
            latest_end_secs: now_ms.saturating_add(max_lifetime_ms) / 1000,
        };
        let last_resort = request.last_resort.map(|kp| expected.check("last_resort", &kp.0, true)).transpose()?;
        let one_time = request
            .key_packages
            .iter()
            .enumerate()
            .map(|(i, kp)| expected.check(&format!("key_packages[{i}]"), &kp.0, false))
            .collect::<Result<Vec<_>>>()?;
        Ok::<_, Error>(KeyPackageUpload { one_time, last_resort })
    })
    .await
    .map_err(Error::internal)??;
    let max_held = state.config.limits.max_keypackages_per_device;
    match state.store.upload_keypackages(auth.device_pk, upload, max_held).await {
        Ok(count) => Ok(axum::Json(UploadKeyPackagesResponse::new(count))),
        Err(StoreError::TooMany) => Err(Error::new(
            ErrorCode::BadRequest,
            format!("a device holds at most {max_held} one-time KeyPackages (limits.max_keypackages_per_device)"),
        )),
        Err(other) => Err(other.into()),
    }
}

/// POST /v1/keypackages/claim
pub async fn claim_keypackages(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<ClaimKeyPackagesRequest>,
) -> Result<axum::Json<ClaimKeyPackagesResponse>> {
    if request.devices.len() > MAX_CLAIM_DEVICES {
        return Err(Error::new(ErrorCode::BadRequest, format!("at most {MAX_CLAIM_DEVICES} devices per claim")));
    }
    let (local, remote): (Vec<DeviceRef>, Vec<DeviceRef>) =
        request.devices.into_iter().partition(|d| d.user.is_of(&state.server_name));
    let mut response = claim_local(&state, local, None).await?;
    if !remote.is_empty() {
        let answer = crate::federation::remote::claim_keypackages(&state, &auth.user_id, remote).await?;
        response.key_packages.extend(answer.key_packages);
        response.missing.extend(answer.missing);
    }
    Ok(axum::Json(response))
}

/// Claims one KeyPackage per device of local users: a one-time one (handed out at most once) or,
/// with none left, the device's last-resort one; tells a device whose pool ran low. For
/// `requester`, a user of another server (`(its server, the user)`), one-time KeyPackages are
/// limited per server and per user as one-time prekeys are (`[federation] one_time_claims_per_*`);
/// past a limit the claim gets the last-resort KeyPackage.
pub async fn claim_local(
    state: &AppState,
    devices: Vec<DeviceRef>,
    requester: Option<(&ServerName, &UserId)>,
) -> Result<ClaimKeyPackagesResponse> {
    let mut key_packages = Vec::new();
    let mut missing = Vec::new();
    let limits = requester.zip(state.federation.as_ref().map(|fed| &fed.keypackage_claim_limits));
    for target in devices {
        let device: Option<DevicePk> = match state.directory.user(&target.user).await? {
            Some(entry) => entry.devices.iter().find(|(_, id)| *id == target.device).map(|(pk, _)| *pk),
            None => None,
        };
        let claimed = match device {
            Some(device) => {
                let now = Instant::now();
                let one_time = match limits {
                    Some(((server, user), limits)) => limits.take(server.as_str(), user.as_str(), device, now),
                    None => true,
                };
                let claimed = state.store.claim_keypackage(device, one_time).await;
                // Counted only when a one-time KeyPackage was handed out.
                let handed_out = matches!(&claimed, Ok(Some(c)) if !c.last_resort);
                if let (true, false, Some(((server, user), limits))) = (one_time, handed_out, limits) {
                    limits.refund(server.as_str(), user.as_str(), device, now);
                }
                claimed?.map(|claimed| (device, claimed))
            }
            None => None,
        };
        let Some((device, claimed)) = claimed else {
            missing.push(target);
            continue;
        };
        tracing::debug!(user = %target.user, device = %target.device, last_resort = claimed.last_resort, "KeyPackage claimed");
        if claimed.remaining < state.config.limits.keypackages_low_watermark {
            crate::ws::notify_keypackages_low(state, device, claimed.remaining);
        }
        key_packages.push(ClaimedKeyPackage::new(target.user, target.device, claimed.bytes));
    }
    Ok(ClaimKeyPackagesResponse::new(key_packages, missing))
}
