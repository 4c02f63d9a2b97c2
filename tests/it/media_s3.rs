//! Media on an S3-compatible store (s3s-fs, which checks SigV4 signatures of presigned URLs):
//! clients upload parts straight to the store through presigned URLs, the server completes
//! the multipart upload, checks the hash and serves downloads from the store.

use crate::media::{complete, create, download, eventually, plaintext, sha256_of, upload_cancelled_then_resumed};
use crate::raw;
use anyhow::{ensure, Context as _};
use parley_crypto::media::{MediaRef, MediaRefExt as _};
use parley_tests::proxy::{CuttingProxy, Fault};
use parley_tests::s3::{files_under, S3Server};
use parley_tests::TestServer;
use serde_json::{json, Value};
use std::time::Duration;

/// S3 takes parts of at least 5 MiB (but the last).
const PART: usize = 5 * 1024 * 1024;
const S3_PARTS: &str = "[media]\npart_bytes = 5242880\nmax_file_bytes = 100000000\n";

/// `PUT`s `bytes` to a presigned URL, optionally through `via` (a proxy's port) with the
/// URL's own `Host` (which the signature covers); the status and the `ETag` answered.
async fn put_presigned(url: &str, bytes: Vec<u8>, via: Option<u16>) -> anyhow::Result<(u16, Option<String>)> {
    let parsed = reqwest::Url::parse(url)?;
    let host = format!("{}:{}", parsed.host_str().context("host")?, parsed.port().context("port")?);
    let mut target = parsed.clone();
    if let Some(port) = via {
        target.set_port(Some(port)).map_err(|()| anyhow::anyhow!("port"))?;
    }
    let response = reqwest::Client::new().put(target).header("host", host).body(bytes).send().await?;
    let etag = response.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_owned);
    Ok((response.status().as_u16(), etag))
}

/// Uploads the parts `state` lists (in parallel) straight to the store; (part, ETag) pairs.
async fn put_all(state: &Value, ciphertext: &[u8], skip: &[u64]) -> anyhow::Result<Vec<(u64, String)>> {
    let parts = state["parts"].as_array().context("parts")?;
    let puts = parts.iter().filter(|p| !skip.contains(&p["part"].as_u64().unwrap_or(0))).map(|part| {
        let number = part["part"].as_u64().unwrap_or(0);
        let offset = part["offset"].as_u64().unwrap_or(0) as usize;
        let size = part["size"].as_u64().unwrap_or(0) as usize;
        let url = part["url"].as_str().unwrap_or_default().to_owned();
        let bytes = ciphertext[offset..offset + size].to_vec();
        async move {
            let (status, etag) = put_presigned(&url, bytes, None).await?;
            ensure!(status == 200, "part {number}: {status}");
            anyhow::Ok((number, etag.context("ETag")?))
        }
    });
    futures_util::future::join_all(puts).await.into_iter().collect()
}

async fn complete_with(base: &str, token: &str, upload_id: &str, parts: &[(u64, String)]) -> anyhow::Result<(u16, Value)> {
    let parts: Vec<Value> = parts.iter().map(|(part, etag)| json!({ "part": part, "etag": etag })).collect();
    raw::post(base, &format!("/v1/media/uploads/{upload_id}/complete"), Some(token), &json!({ "parts": parts })).await
}

#[tokio::test]
async fn parts_go_straight_to_s3_through_presigned_urls_and_the_server_checks_the_file() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let server = TestServer::start_with(&format!("{S3_PARTS}{}", s3.config())).await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let bob = raw::register(base, "bob").await?;
    let file = plaintext(3 * PART + 1000);
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &file, "image/png");
    let sha256 = sha256_of(&media);

    let (status, state) = create(base, &alice.token, ciphertext.len(), &sha256).await?;
    assert_eq!(status, 201, "{state}");
    let upload_id = state["upload_id"].as_str().context("upload_id")?.to_owned();
    let first = state["parts"][0]["url"].as_str().context("url")?.to_owned();
    assert!(first.starts_with(&s3.endpoint), "a presigned URL of the store: {first}");

    // The store checks the signature: a changed one is refused and stores nothing.
    let tampered = match first.find("X-Amz-Signature=") {
        Some(at) => {
            let (head, sig) = first.split_at(at + "X-Amz-Signature=".len());
            let flipped = if sig.starts_with('0') { "1" } else { "0" };
            format!("{head}{flipped}{}", &sig[1..])
        }
        None => anyhow::bail!("no signature in {first}"),
    };
    // (Refusals are checked with small bodies: the store answers before reading a large one
    // and closes the connection, which a client sees as a failed send.)
    let (status, _) = put_presigned(&tampered, ciphertext[..1000].to_vec(), None).await?;
    assert!((400..500).contains(&status), "a tampered presigned URL is refused: {status}");

    let parts = put_all(&state, &ciphertext, &[]).await?;
    assert_eq!(parts.len(), 4, "three full parts and the rest");
    let (status, body) = complete_with(base, &alice.token, &upload_id, &parts[1..]).await?;
    assert_eq!((status, body["code"].as_str()), (409, Some("upload_incomplete")), "{body}");
    let (status, info) = complete_with(base, &alice.token, &upload_id, &parts).await?;
    assert_eq!(status, 200, "{info}");
    let media_id = info["media_id"].as_str().context("media_id")?.to_owned();

    // The upload is over: its presigned URLs are refused now.
    let (status, _) = put_presigned(&first, ciphertext[..1000].to_vec(), None).await?;
    assert!((400..500).contains(&status), "a used presigned URL is refused after completion: {status}");

    let (status, _, body) = download(base, &bob.token, &media_id, None).await?;
    assert_eq!(status, 200);
    assert_eq!(media.decrypt(&body)?, file);
    let (status, _, body) = download(base, &bob.token, &media_id, Some("bytes=5242870-5242889")).await?;
    assert_eq!((status, body.as_slice()), (206, &ciphertext[PART - 10..PART + 10]));

    // Bob forwards it: stored once.
    let (status, state) = create(base, &bob.token, ciphertext.len(), &sha256).await?;
    assert_eq!((status, state["status"].as_str()), (200, Some("complete")));
    let stored = files_under(&s3.bucket_dir());
    let objects: Vec<_> = stored.iter().filter(|p| p.to_string_lossy().contains("/objects/")).collect();
    assert_eq!(objects.len(), 1, "one object for two holders: {stored:?}");
    for path in &stored {
        let bytes = std::fs::read(path)?;
        assert!(!bytes.windows(17).any(|w| w == b"PLAINTEXT-MARKER-"), "{} holds plaintext", path.display());
    }
    Ok(())
}

#[tokio::test]
async fn a_cut_part_is_sent_again_with_a_fresh_url_once_the_old_one_expired() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let server = TestServer::start_with(&format!("{S3_PARTS}url_ttl_ms = 2000\n{}", s3.config())).await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(2 * PART + 1000), "image/png");
    let (_, state) = create(base, &alice.token, ciphertext.len(), &sha256_of(&media)).await?;
    let upload_id = state["upload_id"].as_str().context("upload_id")?.to_owned();
    let first = state["parts"][0]["url"].as_str().context("url")?.to_owned();

    // Part 1 is cut mid-body by a proxy in front of the store; parts 2 and 3 arrive.
    let proxy = CuttingProxy::start(([127, 0, 0, 1], s3.port).into(), |_| Fault::CutRequest).await?;
    let cut = put_presigned(&first, ciphertext[..PART].to_vec(), Some(proxy.port)).await;
    assert!(cut.as_ref().map_or(true, |(status, _)| *status != 200), "the cut part is not stored: {cut:?}");
    let mut parts = put_all(&state, &ciphertext, &[1]).await?;
    let (status, body) = complete_with(base, &alice.token, &upload_id, &parts).await?;
    assert_eq!((status, body["code"].as_str()), (409, Some("upload_incomplete")));

    // The old URL expires; the upload's state hands out fresh ones, and only part 1 goes again.
    let expires: u64 =
        reqwest::Url::parse(&first)?.query_pairs().find(|(k, _)| k == "X-Amz-Expires").context("X-Amz-Expires")?.1.parse()?;
    tokio::time::sleep(Duration::from_secs(expires) + Duration::from_millis(1100)).await;
    let (status, _) = put_presigned(&first, ciphertext[..1000].to_vec(), None).await?;
    assert!((400..500).contains(&status), "an expired presigned URL is refused: {status}");
    let (status, fresh) = raw::get(base, &format!("/v1/media/uploads/{upload_id}"), Some(&alice.token)).await?;
    assert_eq!(status, 200);
    let url = fresh["parts"][0]["url"].as_str().context("url")?;
    let (status, etag) = put_presigned(url, ciphertext[..PART].to_vec(), None).await?;
    assert_eq!(status, 200);
    parts.push((1, etag.context("ETag")?));
    let (status, info) = complete_with(base, &alice.token, &upload_id, &parts).await?;
    assert_eq!(status, 200, "{info}");
    let (_, _, body) = download(base, &alice.token, info["media_id"].as_str().context("media_id")?, None).await?;
    assert!(body == ciphertext);
    Ok(())
}

#[tokio::test]
async fn bytes_that_do_not_hash_to_the_declared_sha256_are_deleted_from_the_store() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let server = TestServer::start_with(&format!("{S3_PARTS}{}", s3.config())).await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let (ciphertext, _) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(PART + 1000), "image/png");
    let (_, other) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(PART + 1000), "image/png");
    let (_, state) = create(base, &alice.token, ciphertext.len(), &sha256_of(&other)).await?;
    let parts = put_all(&state, &ciphertext, &[]).await?;
    let upload_id = state["upload_id"].as_str().context("upload_id")?;
    let (status, body) = complete_with(base, &alice.token, upload_id, &parts).await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("media_hash_mismatch")));
    let left: Vec<_> = files_under(&s3.bucket_dir()).into_iter().filter(|p| !p.to_string_lossy().contains(".s3s")).collect();
    assert!(left.is_empty(), "nothing of it is kept: {left:?}");
    let (status, _) = complete(base, &alice.token, upload_id).await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test]
async fn the_sdk_uploads_to_s3_resumes_from_its_etags_and_downloads_the_same_file() -> anyhow::Result<()> {
    use parley_sdk::media::download_file;
    use std::ops::ControlFlow;
    let s3 = S3Server::start().await?;
    let server = TestServer::start_with(&format!("{S3_PARTS}{}", s3.config())).await?;
    let session = crate::support::register(&server.base_url, "alice").await?;
    let api = parley_sdk::Api::new(&session)?;
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("video.mp4");
    let content = plaintext(2 * PART + 12345);
    std::fs::write(&source, &content)?;
    let work = dir.path().join("work");

    // The store tracks the parts, not the server: after a cancel, the SDK skips the part it
    // holds an ETag for in its journal.
    let uploaded = upload_cancelled_then_resumed(&api, &source, "video/mp4", &work, PART as u64).await?;

    let dest = dir.path().join("received.mp4");
    download_file(&api, &uploaded.server, &uploaded.media_id, &uploaded.media, &dest, |_, _| ControlFlow::Continue(())).await?;
    assert!(std::fs::read(&dest)? == content);
    Ok(())
}

#[tokio::test]
async fn a_file_on_s3_crosses_into_the_other_servers_own_s3_store() -> anyhow::Result<()> {
    use parley_tests::fednet::{Discovery, FedNet};
    let (store_a, store_b) = (S3Server::start().await?, S3Server::start().await?);
    let mut net = FedNet::start(&[("a.test", Discovery::Srv)], &format!("{S3_PARTS}{}", store_a.config())).await?;
    net.add("b.test", Discovery::Srv, &format!("{S3_PARTS}{}", store_b.config())).await?;
    let (a, b) = (net.server("a.test").base_url.clone(), net.server("b.test").base_url.clone());
    let alice = raw::register(&a, "alice").await?;
    let bob = raw::register(&b, "bob").await?;
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(PART + 1000), "image/jpeg");
    let media_id = upload_to_s3(&a, &alice.token, &ciphertext, &sha256_of(&media)).await?;

    // Bob downloads through b.test, which fetches the file from a.test into its own store (in
    // parts S3 takes: at least 5 MiB but the last).
    let get = |range: Option<&'static str>| {
        let mut request = reqwest::Client::new().get(format!("{b}/v1/media/a.test/{media_id}")).bearer_auth(&bob.token);
        if let Some(range) = range {
            request = request.header("range", range);
        }
        async move {
            let response = request.send().await?;
            anyhow::Ok((response.status().as_u16(), response.bytes().await?.to_vec()))
        }
    };
    let (status, body) = get(None).await?;
    assert_eq!(status, 200);
    assert!(body == ciphertext, "bob gets alice's ciphertext");
    let (status, body) = get(Some("bytes=5242870-5242889")).await?;
    assert_eq!((status, body.as_slice()), (206, &ciphertext[PART - 10..PART + 10]));
    assert_eq!(objects(&store_b).len(), 1, "b.test keeps its copy in its own store");
    assert_eq!(net.server("b.test").counter("media_fetches").await?, 1, "fetched once");
    // With a.test down, b.test still serves its copy.
    net.server("a.test").stop().await?;
    assert_eq!(get(None).await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn unreferenced_files_and_expired_uploads_leave_the_s3_store() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    // The upload lives 5 s: its presigned URLs last that long at most (S3 counts whole seconds),
    // and a loaded machine can take more than 1 s between the upload's creation and its PUT.
    let short = "retention_ms = 2000\ngrace_ms = 0\nupload_ttl_ms = 5000\nsweep_interval_ms = 100\n";
    let server = TestServer::start_with(&format!("{S3_PARTS}{short}{}", s3.config())).await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(PART + 1000), "image/jpeg");
    let media_id = upload_to_s3(base, &alice.token, &ciphertext, &sha256_of(&media)).await?;
    // An upload left half done: one part in the store's multipart upload.
    let (_, other) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(PART + 1000), "image/png");
    let (status, half) = create(base, &alice.token, ciphertext.len(), &sha256_of(&other)).await?;
    assert_eq!(status, 201, "{half}");
    put_all(&json!({"parts": [half["parts"][0].clone()]}), &ciphertext, &[]).await?;

    let left = || -> Vec<std::path::PathBuf> {
        files_under(&s3.bucket_dir()).into_iter().filter(|p| !p.to_string_lossy().contains(".s3s")).collect()
    };
    let used = || async {
        let (_, config) = raw::get(base, "/v1/media/config", Some(&alice.token)).await?;
        anyhow::Ok(config["used_bytes"].as_u64())
    };
    let emptied = eventually("the store is empty and nothing counts against the quota", || async {
        Ok(left().is_empty() && used().await? == Some(0))
    })
    .await;
    ensure!(emptied.is_ok(), "left in the store: {:?}; {:?} bytes used", left(), used().await?);
    let (status, _, _) = download(base, &alice.token, &media_id, None).await?;
    assert_eq!(status, 404);
    // s3s-fs keeps a multipart upload's parts as `<root>/.upload_id-<id>.part-<n>`.
    let everything = files_under(s3.root.path());
    ensure!(
        everything.iter().all(|p| !p.to_string_lossy().contains(".upload")),
        "the half upload's parts are gone: {everything:?}"
    );
    Ok(())
}

/// The objects (files, not uploads) in a store.
fn objects(store: &S3Server) -> Vec<std::path::PathBuf> {
    files_under(&store.bucket_dir()).into_iter().filter(|p| p.to_string_lossy().contains("/objects/")).collect()
}

/// Uploads `ciphertext` whole through presigned URLs; its media id.
async fn upload_to_s3(base: &str, token: &str, ciphertext: &[u8], sha256: &[u8; 32]) -> anyhow::Result<String> {
    let (status, state) = create(base, token, ciphertext.len(), sha256).await?;
    ensure!(status == 201, "create: {status} {state}");
    let parts = put_all(&state, ciphertext, &[]).await?;
    let (status, info) = complete_with(base, token, state["upload_id"].as_str().context("upload_id")?, &parts).await?;
    ensure!(status == 200, "complete: {status} {info}");
    Ok(info["media_id"].as_str().context("media_id")?.to_owned())
}

#[tokio::test]
async fn old_files_move_from_the_filesystem_to_a_cold_s3_store_and_are_served_from_there() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let cold = s3.config().replace("[media.s3]", "[media.cold.s3]");
    let server = TestServer::start_with(&format!(
        "[media]\npart_bytes = 1048576\nmax_file_bytes = 100000000\nsweep_interval_ms = 100\n[media.cold]\nafter_ms = 0\n{cold}"
    ))
    .await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    // Larger than one S3 part, so the move is a multipart upload of parts S3 takes.
    let file = plaintext(2 * PART + 5);
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &file, "application/pdf");
    let (status, state) = create(base, &alice.token, ciphertext.len(), &sha256_of(&media)).await?;
    assert_eq!(status, 201, "{state}");
    let parts = state["parts"].as_array().context("parts")?;
    for part in parts {
        let (offset, size) = (part["offset"].as_u64().unwrap_or(0) as usize, part["size"].as_u64().unwrap_or(0) as usize);
        let url = format!("{base}{}", part["url"].as_str().context("url")?);
        let response = reqwest::Client::new().put(url).body(ciphertext[offset..offset + size].to_vec()).send().await?;
        assert_eq!(response.status().as_u16(), 204);
    }
    let (status, info) = complete(base, &alice.token, state["upload_id"].as_str().context("upload_id")?).await?;
    assert_eq!(status, 200, "{info}");
    let media_id = info["media_id"].as_str().context("media_id")?.to_owned();

    let hot = server.data_dir().join("media").join("objects");
    eventually("the file moves to the cold store", || async { Ok(files_under(&hot).is_empty() && objects(&s3).len() == 1) })
        .await?;
    assert!(std::fs::read(&objects(&s3)[0])? == ciphertext, "the cold store holds the same ciphertext");
    let (status, _, body) = download(base, &alice.token, &media_id, None).await?;
    assert_eq!(status, 200);
    assert_eq!(media.decrypt(&body)?, file);
    let (status, _, body) = download(base, &alice.token, &media_id, Some("bytes=5242870-5242889")).await?;
    assert_eq!((status, body.as_slice()), (206, &ciphertext[PART - 10..PART + 10]));
    Ok(())
}

/// Two workers of one homeserver (one PostgreSQL database, one server key) on one S3 store:
/// an upload created at one worker is completed at the other, and the file is served by both.
#[tokio::test]
async fn two_workers_share_the_s3_store() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let config = format!("{S3_PARTS}{}", s3.config());
    let one = TestServer::start_on(parley_tests::Backend::Postgres, &config).await?;
    let mut two = TestServer::prepare_as(parley_tests::Mode::InProcess, &config)?.worker_of(&one)?;
    two.restart().await?;
    let alice = raw::register(&one.base_url, "alice").await?;
    let bob = raw::register(&two.base_url, "bob").await?;
    let file = plaintext(PART + 1000);
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &file, "image/png");

    let (status, state) = create(&one.base_url, &alice.token, ciphertext.len(), &sha256_of(&media)).await?;
    assert_eq!(status, 201, "{state}");
    let upload_id = state["upload_id"].as_str().context("upload_id")?.to_owned();
    let parts = put_all(&state, &ciphertext, &[]).await?;
    let (status, info) = complete_with(&two.base_url, &alice.token, &upload_id, &parts).await?;
    assert_eq!(status, 200, "completed at the other worker: {info}");
    let media_id = info["media_id"].as_str().context("media_id")?.to_owned();
    for base in [&one.base_url, &two.base_url] {
        let (status, _, body) = download(base, &bob.token, &media_id, None).await?;
        assert_eq!(status, 200);
        assert_eq!(media.decrypt(&body)?, file);
    }
    Ok(())
}
