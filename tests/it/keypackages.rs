//! The KeyPackage directory: uploads are validated (the leaf must be the uploading device with
//! its signing key, the lifetime current and not too long, the bytes a KeyPackage), each
//! one-time KeyPackage is handed out at most once even under many parallel claims, the
//! last-resort one follows only when the pool is empty, limits hold, and devices are told to
//! replenish.

use crate::raw;
use crate::support::register;
use parley_crypto::identity::DeviceIdentity;
use parley_crypto::mls::{KeyPackage, Lifetime, MemoryStorage, MlsClient};
use parley_sdk::spec::error::DeviceRef;
use parley_sdk::spec::v1::keypackages::{ClaimKeyPackagesRequest, UploadKeyPackagesRequest, MAX_KEYPACKAGES_PER_UPLOAD};
use parley_sdk::spec::v1::keys::UploadKeysRequest;
use parley_sdk::{Api, ErrorCode, Session};
use parley_tests::TestServer;
use rand::rngs::OsRng;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

const DAY_SECS: u64 = 24 * 60 * 60;

/// A device with uploaded device keys and an MLS client that makes its KeyPackages.
struct MlsDevice {
    session: Session,
    identity: DeviceIdentity,
    client: MlsClient<MemoryStorage>,
}

impl MlsDevice {
    /// Uploads `session`'s device keys (a fresh identity) and sets up its MLS client.
    async fn new(session: Session) -> anyhow::Result<Self> {
        let identity = DeviceIdentity::generate(&mut OsRng);
        let mut upload = UploadKeysRequest::default();
        upload.device_keys = Some(identity.device_keys(&session.user_id, &session.device_id));
        Api::new(&session)?.upload_keys(&upload).await?;
        let client = MlsClient::new(MemoryStorage::default(), session.user_id.clone(), session.device_id.clone(), &identity);
        Ok(Self { session, identity, client })
    }

    fn key_package_for(&self, valid_for_secs: u64, last_resort: bool) -> anyhow::Result<Vec<u8>> {
        let lifetime = Lifetime::starting_at(now_secs(), valid_for_secs);
        Ok(self.client.create_key_package(&self.identity, lifetime, last_resort)?.to_bytes().to_vec())
    }

    /// A KeyPackage valid for a week.
    fn key_package(&self, last_resort: bool) -> anyhow::Result<Vec<u8>> {
        self.key_package_for(7 * DAY_SECS, last_resort)
    }

    fn key_packages(&self, n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
        (0..n).map(|_| self.key_package(false)).collect()
    }

    fn api(&self) -> anyhow::Result<Api> {
        Ok(Api::new(&self.session)?)
    }

    fn claim(&self) -> ClaimKeyPackagesRequest {
        ClaimKeyPackagesRequest::new(vec![DeviceRef::new(self.session.user_id.clone(), self.session.device_id.clone())])
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

fn code(result: Result<impl std::fmt::Debug, parley_sdk::Error>) -> Option<ErrorCode> {
    result.err().and_then(|e| e.server_code())
}

/// Claims `target`'s device once as `claimer`: the KeyPackage's bytes.
async fn claim_one(claimer: &Api, target: &MlsDevice) -> anyhow::Result<Vec<u8>> {
    let response = claimer.claim_keypackages(&target.claim()).await?;
    anyhow::ensure!(response.key_packages.len() == 1 && response.missing.is_empty(), "one KeyPackage: {response:?}");
    let claimed = &response.key_packages[0];
    anyhow::ensure!(claimed.user == target.session.user_id && claimed.device == target.session.device_id);
    Ok(claimed.key_package.0.clone())
}

#[tokio::test]
async fn one_time_keypackages_are_claimed_at_most_once_under_parallel_claims() -> anyhow::Result<()> {
    let server = TestServer::start_with("[limits]\nkeypackages_low_watermark = 5\n").await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = MlsDevice::new(register(&server.base_url, "bob").await?).await?;
    let one_time = bob.key_packages(10)?;
    let last_resort = bob.key_package(true)?;
    let upload = UploadKeyPackagesRequest::new(one_time.clone(), Some(last_resort.clone()));
    assert_eq!(bob.api()?.upload_keypackages(&upload).await?.count, 10);
    // Uploading the same KeyPackages again keeps each once.
    assert_eq!(bob.api()?.upload_keypackages(&upload).await?.count, 10);
    let mut socket = raw::connect(&server.base_url, bob.session.access_token(), 0).await.map_err(|s| anyhow::anyhow!("{s}"))?;
    raw::next_of(&mut socket, "hello", Duration::from_secs(10)).await?;

    let claimers = (0..30).map(|_| {
        let api = Api::new(&alice).expect("api");
        let claim = bob.claim();
        tokio::spawn(async move { api.claim_keypackages(&claim).await })
    });
    let mut handed_out = Vec::new();
    for claimer in claimers.collect::<Vec<_>>() {
        let response = claimer.await??;
        assert_eq!(response.key_packages.len(), 1, "{response:?}");
        handed_out.push(response.key_packages[0].key_package.0.clone());
    }
    let (repeated, unique): (Vec<_>, Vec<_>) = handed_out.into_iter().partition(|kp| *kp == last_resort);
    assert_eq!(repeated.len(), 20, "the last-resort KeyPackage once the pool was empty");
    assert_eq!(unique.iter().collect::<BTreeSet<_>>(), one_time.iter().collect::<BTreeSet<_>>(), "each one-time one once");
    assert_eq!(unique.len(), 10, "none handed out twice");
    // What comes back is bob's device, verified.
    let parsed = KeyPackage::from_bytes(&unique[0])?;
    assert_eq!(parsed.leaf(), bob.client.own_leaf());

    // The device was told to replenish.
    let low = raw::next_of(&mut socket, "keypackages_low", Duration::from_secs(10)).await?;
    assert!(low["count"].as_u64().is_some_and(|n| n < 5), "{low}");
    // And is told again when it connects.
    let mut again = raw::connect(&server.base_url, bob.session.access_token(), 0).await.map_err(|s| anyhow::anyhow!("{s}"))?;
    assert_eq!(raw::next_of(&mut again, "keypackages_low", Duration::from_secs(10)).await?["count"], 0);

    // Devices without KeyPackages, and unknown devices, come back as missing.
    let nobody = ClaimKeyPackagesRequest::new(vec![DeviceRef::new(alice.user_id.clone(), alice.device_id.clone())]);
    let response = bob.api()?.claim_keypackages(&nobody).await?;
    assert!(response.key_packages.is_empty() && response.missing.len() == 1, "{response:?}");
    Ok(())
}

#[tokio::test]
async fn the_last_resort_keypackage_comes_only_when_the_pool_is_empty() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = Api::new(&register(&server.base_url, "alice").await?)?;
    let bob = MlsDevice::new(register(&server.base_url, "bob").await?).await?;
    let first = bob.key_packages(2)?;
    let last_resort = bob.key_package(true)?;
    bob.api()?.upload_keypackages(&UploadKeyPackagesRequest::new(first.clone(), Some(last_resort.clone()))).await?;
    assert_eq!(claim_one(&alice, &bob).await?, first[0]);
    assert_eq!(claim_one(&alice, &bob).await?, first[1]);
    assert_eq!(claim_one(&alice, &bob).await?, last_resort);
    assert_eq!(claim_one(&alice, &bob).await?, last_resort, "the last-resort KeyPackage stays");
    // A new one-time KeyPackage is preferred again; a new last-resort one replaces the old.
    let more = bob.key_package(false)?;
    let newer_last_resort = bob.key_package(true)?;
    let upload = UploadKeyPackagesRequest::new(vec![more.clone()], Some(newer_last_resort.clone()));
    assert_eq!(bob.api()?.upload_keypackages(&upload).await?.count, 1);
    assert_eq!(claim_one(&alice, &bob).await?, more);
    assert_eq!(claim_one(&alice, &bob).await?, newer_last_resort);
    Ok(())
}

#[tokio::test]
async fn keypackages_that_are_not_the_uploading_devices_or_malformed_are_refused() -> anyhow::Result<()> {
    let server = TestServer::start_with(&format!(
        "[limits]\nmax_keypackages_per_device = 5\nmax_keypackage_lifetime_ms = {}\n",
        10 * DAY_SECS * 1000
    ))
    .await?;
    let alice_session = register(&server.base_url, "alice").await?;
    let bob_session = register(&server.base_url, "bob").await?;
    let bob_api = Api::new(&bob_session)?;
    let upload = |kps: Vec<Vec<u8>>| UploadKeyPackagesRequest::new(kps, None);

    // Before its device keys, a device cannot upload KeyPackages.
    let early_identity = DeviceIdentity::generate(&mut OsRng);
    let early =
        MlsClient::new(MemoryStorage::default(), bob_session.user_id.clone(), bob_session.device_id.clone(), &early_identity);
    let early_kp = early.create_key_package(&early_identity, Lifetime::starting_at(now_secs(), DAY_SECS), false)?;
    assert_eq!(code(bob_api.upload_keypackages(&upload(vec![early_kp.to_bytes().to_vec()])).await), Some(ErrorCode::BadRequest));

    let alice = MlsDevice::new(alice_session).await?;
    let bob = MlsDevice::new(bob_session).await?;
    // A KeyPackage naming bob's device but signed by another key (here the one made before
    // bob's device keys were uploaded) is refused.
    assert_eq!(
        code(bob_api.upload_keypackages(&upload(vec![early_kp.to_bytes().to_vec()])).await),
        Some(ErrorCode::BadKeypackage),
        "a leaf key that is not the device's"
    );
    // Another device's KeyPackage is refused.
    assert_eq!(code(bob_api.upload_keypackages(&upload(vec![alice.key_package(false)?])).await), Some(ErrorCode::BadKeypackage));
    // Bytes that are not a KeyPackage, or a damaged one.
    assert_eq!(
        code(bob_api.upload_keypackages(&upload(vec![b"not a KeyPackage".to_vec()])).await),
        Some(ErrorCode::BadKeypackage)
    );
    let mut damaged = bob.key_package(false)?;
    let middle = damaged.len() / 2;
    damaged[middle] ^= 1;
    assert_eq!(code(bob_api.upload_keypackages(&upload(vec![damaged])).await), Some(ErrorCode::BadKeypackage));
    // The last-resort extension belongs in `last_resort` only, and must be there.
    assert_eq!(code(bob_api.upload_keypackages(&upload(vec![bob.key_package(true)?])).await), Some(ErrorCode::BadKeypackage));
    let wrong_last_resort = UploadKeyPackagesRequest::new(vec![], Some(bob.key_package(false)?));
    assert_eq!(code(bob_api.upload_keypackages(&wrong_last_resort).await), Some(ErrorCode::BadKeypackage));
    // A lifetime longer than the server's limit.
    assert_eq!(
        code(bob_api.upload_keypackages(&upload(vec![bob.key_package_for(11 * DAY_SECS, false)?])).await),
        Some(ErrorCode::BadKeypackage)
    );
    // One bad KeyPackage refuses the whole upload.
    let mixed = upload(vec![bob.key_package(false)?, alice.key_package(false)?]);
    assert_eq!(code(bob_api.upload_keypackages(&mixed).await), Some(ErrorCode::BadKeypackage));
    // Bad base64 is bad JSON.
    let (status, body) = raw::post(
        &server.base_url,
        "/v1/keypackages",
        Some(bob.session.access_token()),
        &json!({"key_packages": ["not base64!"]}),
    )
    .await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_json")));

    // Limits: per upload, and held per device (5 here).
    let too_many = upload(vec![bob.key_package(false)?; MAX_KEYPACKAGES_PER_UPLOAD + 1]);
    assert_eq!(code(bob_api.upload_keypackages(&too_many).await), Some(ErrorCode::BadRequest));
    assert_eq!(bob_api.upload_keypackages(&upload(bob.key_packages(4)?)).await?.count, 4, "nothing refused was stored");
    assert_eq!(code(bob_api.upload_keypackages(&upload(bob.key_packages(2)?)).await), Some(ErrorCode::BadRequest));
    assert_eq!(bob_api.upload_keypackages(&upload(bob.key_packages(1)?)).await?.count, 5);
    Ok(())
}

/// `claims` claims of `target`'s device by `claimer`: (one-time KeyPackages, last-resort ones).
async fn claim_repeatedly(
    claimer: &Session,
    target: &MlsDevice,
    last_resort: &[u8],
    claims: usize,
) -> anyhow::Result<(usize, usize)> {
    let api = Api::new(claimer)?;
    let (mut one_time, mut repeated) = (0, 0);
    for _ in 0..claims {
        let key_package = claim_one(&api, target).await?;
        anyhow::ensure!(KeyPackage::from_bytes(&key_package)?.leaf() == target.client.own_leaf(), "the target's KeyPackage");
        match key_package == last_resort {
            true => repeated += 1,
            false => one_time += 1,
        }
    }
    Ok((one_time, repeated))
}

#[tokio::test]
async fn another_server_claims_keypackages_within_the_one_time_claim_limits() -> anyhow::Result<()> {
    use parley_tests::fednet::{Discovery, FedNet};
    // The defaults of [federation] one_time_claims_per_server (10) and one_time_claims_per_user (3).
    let defaults = parley_server::config::FederationConfig::default();
    let (per_server, per_user) = (defaults.one_time_claims_per_server as usize, defaults.one_time_claims_per_user as usize);
    assert!(per_user <= 8 && per_user <= per_server && per_server <= 6 * per_user && per_server < 50, "the test needs these");
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let bob = MlsDevice::new(register(&net.server("b.test").base_url, "bob").await?).await?;
    let last_resort = bob.key_package(true)?;
    let upload = UploadKeyPackagesRequest::new(bob.key_packages(50)?, Some(last_resort.clone()));
    assert_eq!(bob.api()?.upload_keypackages(&upload).await?.count, 50);

    // One user of a.test claims bob's device 20 times: a few one-time KeyPackages, then the
    // last-resort one.
    let alice = register(&net.server("a.test").base_url, "alice").await?;
    assert_eq!(claim_repeatedly(&alice, &bob, &last_resort, 20).await?, (per_user, 20 - per_user), "alice's 20 claims");
    // Five more users of a.test, eight claims each: the server as a whole is limited too.
    let mut one_time = per_user;
    for name in ["u1", "u2", "u3", "u4", "u5"] {
        let user = register(&net.server("a.test").base_url, name).await?;
        one_time += claim_repeatedly(&user, &bob, &last_resort, 8).await?.0;
    }
    assert_eq!(one_time, per_server, "one-time KeyPackages a.test got in 60 claims");
    // bob still has the rest, and a user of his own server still gets a one-time one.
    let left = bob.api()?.upload_keypackages(&UploadKeyPackagesRequest::default()).await?.count;
    assert_eq!(left as usize, 50 - per_server);
    let carol = register(&net.server("b.test").base_url, "carol").await?;
    assert_eq!(claim_repeatedly(&carol, &bob, &last_resort, 1).await?, (1, 0), "a local claim");
    // A device of a.test and one of b.test in one claim, and an unknown device of b.test.
    let dave = MlsDevice::new(register(&net.server("a.test").base_url, "dave").await?).await?;
    dave.api()?.upload_keypackages(&UploadKeyPackagesRequest::new(dave.key_packages(1)?, None)).await?;
    let unknown = DeviceRef::new(bob.session.user_id.clone(), "NOSUCHDEVICE".parse()?);
    let mut devices = bob.claim().devices;
    devices.extend(dave.claim().devices);
    devices.push(unknown.clone());
    let response = Api::new(&alice)?.claim_keypackages(&ClaimKeyPackagesRequest::new(devices)).await?;
    let claimed: BTreeSet<_> = response.key_packages.iter().map(|kp| (kp.user.to_string(), kp.device.to_string())).collect();
    let expected: BTreeSet<_> =
        [&bob, &dave].iter().map(|d| (d.session.user_id.to_string(), d.session.device_id.to_string())).collect();
    assert_eq!(claimed, expected);
    assert_eq!(response.missing, vec![unknown]);
    Ok(())
}
