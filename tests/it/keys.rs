//! The key directory: uploads are checked, one-time prekeys are handed out at most once even
//! under many parallel claims, the last-resort key follows, and devices are told to replenish.

use crate::support::{register, Device};
use parley_crypto::identity::DeviceIdentity;
use parley_crypto::KeyPair;
use parley_sdk::spec::error::DeviceRef;
use parley_sdk::spec::v1::keys::{
    ClaimRequest, DeviceKeys, DeviceListEntry, OneTimePrekey, SignedDeviceList, SignedPrekey, UploadKeysRequest,
    DEVICE_LIST_CONTEXT, SIGNED_PREKEY_CONTEXT,
};
use parley_sdk::{Api, ErrorCode, Event, Session};
use parley_tests::TestServer;
use rand::rngs::OsRng;
use std::collections::BTreeSet;

struct Keys {
    signing: KeyPair,
    device_keys: DeviceKeys,
}

fn device_keys(session: &Session) -> Keys {
    let device = DeviceIdentity::generate(&mut OsRng);
    let device_keys = device.device_keys(&session.user_id, &session.device_id);
    Keys { signing: KeyPair::from_seed(&device.signing_key().seed()), device_keys }
}

/// A fresh, valid x25519 public key.
fn x25519_public() -> Vec<u8> {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::random_from_rng(OsRng)).as_bytes().to_vec()
}

fn signed_prekey(signing: &KeyPair, key_id: u32) -> SignedPrekey {
    let mut prekey = SignedPrekey::new(key_id, x25519_public(), vec![]);
    prekey.signature.0 = signing.sign_object(SIGNED_PREKEY_CONTEXT, &prekey).unwrap().to_vec();
    prekey
}

fn code(result: Result<impl std::fmt::Debug, parley_sdk::Error>) -> Option<ErrorCode> {
    result.err().and_then(|e| e.server_code())
}

#[tokio::test]
async fn one_time_prekeys_are_claimed_at_most_once_under_parallel_claims() -> anyhow::Result<()> {
    let server = TestServer::start_with("[limits]\nprekey_low_watermark = 5\n").await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let bob_api = Api::new(&bob)?;
    let keys = device_keys(&bob);

    // Prekeys before device keys, keys of another device, and bad signatures are refused.
    let mut early = UploadKeysRequest::default();
    early.one_time_prekeys = vec![OneTimePrekey::new(1, x25519_public())];
    assert_eq!(code(bob_api.upload_keys(&early).await), Some(ErrorCode::BadRequest));
    let mut foreign = UploadKeysRequest::default();
    foreign.device_keys = Some(keys.device_keys.clone());
    assert_eq!(code(Api::new(&alice)?.upload_keys(&foreign).await), Some(ErrorCode::Forbidden));
    let mut forged = UploadKeysRequest::default();
    let mut bad_keys = keys.device_keys.clone();
    bad_keys.identity_key.0[0] ^= 1;
    forged.device_keys = Some(bad_keys);
    assert_eq!(code(bob_api.upload_keys(&forged).await), Some(ErrorCode::BadRequest));

    let mut upload = UploadKeysRequest::default();
    upload.device_keys = Some(keys.device_keys.clone());
    upload.signed_prekey = Some(signed_prekey(&keys.signing, 1000));
    upload.last_resort_prekey = Some(signed_prekey(&keys.signing, 2000));
    upload.one_time_prekeys = (1..=20).map(|id| OneTimePrekey::new(id, x25519_public())).collect();
    assert_eq!(bob_api.upload_keys(&upload).await?.one_time_prekey_count, 20);
    // Uploading the same keys again is harmless; different device keys are refused.
    assert_eq!(bob_api.upload_keys(&upload).await?.one_time_prekey_count, 20);
    let mut other = UploadKeysRequest::default();
    other.device_keys = Some(device_keys(&bob).device_keys);
    assert_eq!(code(bob_api.upload_keys(&other).await), Some(ErrorCode::Forbidden));
    // A signed prekey signed by some other key is refused.
    let mut wrong = UploadKeysRequest::default();
    wrong.signed_prekey = Some(signed_prekey(&KeyPair::generate(), 1001));
    assert_eq!(code(bob_api.upload_keys(&wrong).await), Some(ErrorCode::BadRequest));

    let mut b1 = Device::connect(&bob).await?;
    let claim = ClaimRequest::new(vec![DeviceRef::new(bob.user_id.clone(), bob.device_id.clone())]);
    let claimers = (0..40).map(|_| {
        let api = Api::new(&alice).expect("api");
        let claim = claim.clone();
        tokio::spawn(async move { api.claim_keys(&claim).await })
    });
    let mut one_time = Vec::new();
    let mut last_resort = 0;
    for claimer in claimers.collect::<Vec<_>>() {
        let response = claimer.await??;
        assert_eq!(response.bundles.len(), 1);
        let bundle = &response.bundles[0];
        assert_eq!(bundle.device_keys, keys.device_keys);
        assert_eq!(bundle.signed_prekey.key_id, 1000);
        match (&bundle.one_time_prekey, &bundle.last_resort_prekey) {
            (Some(prekey), None) => one_time.push(prekey.key_id),
            (None, Some(prekey)) => {
                assert_eq!(prekey.key_id, 2000);
                last_resort += 1;
            }
            other => panic!("a bundle has exactly one of one-time or last-resort: {other:?}"),
        }
    }
    let distinct: BTreeSet<u32> = one_time.iter().copied().collect();
    assert_eq!(one_time.len(), 20, "every one-time prekey handed out");
    assert_eq!(distinct.len(), 20, "none handed out twice");
    assert_eq!(last_resort, 20);

    // The device was told to replenish.
    let low = b1
        .next(|e| match e {
            Event::PrekeysLow { one_time_prekey_count } => Some(one_time_prekey_count),
            _ => None,
        })
        .await?;
    assert!(low < 5);

    // Unknown devices come back as missing.
    let nobody = ClaimRequest::new(vec![DeviceRef::new(alice.user_id.clone(), alice.device_id.clone())]);
    let response = Api::new(&bob)?.claim_keys(&nobody).await?;
    assert!(response.bundles.is_empty() && response.missing.len() == 1);
    Ok(())
}

#[tokio::test]
async fn device_lists_are_signed_and_only_move_forward() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let api = Api::new(&alice)?;
    let identity = KeyPair::generate();
    let keys = device_keys(&alice);
    let list = |version: u64, signer: &KeyPair| {
        let entry = DeviceListEntry::new(
            alice.device_id.clone(),
            keys.device_keys.signing_key.0.clone(),
            keys.device_keys.identity_key.0.clone(),
        );
        let mut list =
            SignedDeviceList::new(alice.user_id.clone(), version, identity.public().as_bytes().to_vec(), vec![entry], vec![]);
        list.signature.0 = signer.sign_object(DEVICE_LIST_CONTEXT, &list).unwrap().to_vec();
        list
    };
    assert_eq!(code(api.device_list(&alice.user_id).await), Some(ErrorCode::NotFound));
    api.put_device_list(&list(1, &identity)).await?;
    assert_eq!(api.device_list(&alice.user_id).await?, list(1, &identity));
    assert_eq!(code(api.put_device_list(&list(1, &identity)).await), Some(ErrorCode::BadRequest), "same version");
    assert_eq!(code(api.put_device_list(&list(2, &KeyPair::generate())).await), Some(ErrorCode::BadRequest), "bad signature");
    api.put_device_list(&list(5, &identity)).await?;
    assert_eq!(code(api.put_device_list(&list(3, &identity)).await), Some(ErrorCode::BadRequest), "rollback");
    assert_eq!(code(Api::new(&bob)?.put_device_list(&list(9, &identity)).await), Some(ErrorCode::Forbidden));
    assert_eq!(Api::new(&bob)?.device_list(&alice.user_id).await?.version, 5);
    Ok(())
}

/// Uploads device keys, a signed prekey (1000), a last-resort prekey (2000) and one-time
/// prekeys 1..=`count` for `session`'s device.
async fn upload_bundle(session: &Session, count: u32) -> anyhow::Result<Keys> {
    let keys = device_keys(session);
    let mut upload = UploadKeysRequest::default();
    upload.device_keys = Some(keys.device_keys.clone());
    upload.signed_prekey = Some(signed_prekey(&keys.signing, 1000));
    upload.last_resort_prekey = Some(signed_prekey(&keys.signing, 2000));
    upload.one_time_prekeys = (1..=count).map(|id| OneTimePrekey::new(id, x25519_public())).collect();
    assert_eq!(Api::new(session)?.upload_keys(&upload).await?.one_time_prekey_count, count);
    Ok(keys)
}

/// `claims` claims of `target`'s device by `claimer`: (one-time prekeys, last-resort prekeys).
async fn claim_repeatedly(claimer: &Session, target: &Session, claims: usize) -> anyhow::Result<(usize, usize)> {
    let api = Api::new(claimer)?;
    let claim = ClaimRequest::new(vec![DeviceRef::new(target.user_id.clone(), target.device_id.clone())]);
    let (mut one_time, mut last_resort) = (0, 0);
    for _ in 0..claims {
        let response = api.claim_keys(&claim).await?;
        anyhow::ensure!(response.bundles.len() == 1, "one bundle for the device: {response:?}");
        match (&response.bundles[0].one_time_prekey, &response.bundles[0].last_resort_prekey) {
            (Some(_), None) => one_time += 1,
            (None, Some(prekey)) if prekey.key_id == 2000 => last_resort += 1,
            other => anyhow::bail!("a bundle has exactly one of one-time or last-resort: {other:?}"),
        }
    }
    Ok((one_time, last_resort))
}

#[tokio::test]
async fn another_server_cannot_drain_the_one_time_prekeys_of_a_device() -> anyhow::Result<()> {
    use parley_tests::fednet::{Discovery, FedNet};
    // The defaults of [federation] one_time_claims_per_server (10) and one_time_claims_per_user (3).
    let defaults = parley_server::config::FederationConfig::default();
    let (per_server, per_user) = (defaults.one_time_claims_per_server as usize, defaults.one_time_claims_per_user as usize);
    assert!(per_user <= 8 && per_user <= per_server && per_server <= 6 * per_user && per_server < 50, "the test needs these");
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let bob = register(&net.server("b.test").base_url, "bob").await?;
    upload_bundle(&bob, 50).await?;

    // One user of a.test claims bob's device 20 times: a few one-time prekeys, then the
    // last-resort key.
    let alice = register(&net.server("a.test").base_url, "alice").await?;
    assert_eq!(claim_repeatedly(&alice, &bob, 20).await?, (per_user, 20 - per_user), "alice's 20 claims");
    // Five more users of a.test, eight claims each: the server as a whole is limited too.
    let mut one_time = per_user;
    for name in ["u1", "u2", "u3", "u4", "u5"] {
        let user = register(&net.server("a.test").base_url, name).await?;
        one_time += claim_repeatedly(&user, &bob, 8).await?.0;
    }
    assert_eq!(one_time, per_server, "one-time prekeys a.test got in 60 claims");
    // bob still has the rest, and a user of his own server still gets one.
    let left = Api::new(&bob)?.upload_keys(&UploadKeysRequest::default()).await?.one_time_prekey_count;
    assert_eq!(left as usize, 50 - per_server);
    let carol = register(&net.server("b.test").base_url, "carol").await?;
    assert_eq!(claim_repeatedly(&carol, &bob, 1).await?, (1, 0), "a local claim");
    Ok(())
}
