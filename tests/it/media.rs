//! Media on the filesystem store (spec/media.md): parallel part uploads, resume after a cut
//! connection, dedup, ranged downloads, limits as typed errors, single-use and expiring upload
//! URLs, expiry and garbage collection, and no plaintext in what the server stores.

use crate::raw;
use crate::support::T;
use anyhow::{ensure, Context as _};
use parley_crypto::media::{MediaRef, MediaRefExt as _};
use parley_tests::proxy::{CuttingProxy, Fault};
use parley_tests::s3::files_under;
use parley_tests::TestServer;
use serde_json::{json, Value};
use std::time::Duration;

/// Parts of 64 KiB (the smallest the server allows), so a few hundred KiB make several parts.
pub(crate) const SMALL_PARTS: &str = "[media]\npart_bytes = 65536\nmax_file_bytes = 100000000\n";

/// A file of `len` bytes, recognisable in raw storage by a repeated marker.
pub(crate) fn plaintext(len: usize) -> Vec<u8> {
    b"PLAINTEXT-MARKER-".iter().copied().cycle().take(len).collect()
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(crate) fn sha256_of(media: &MediaRef) -> [u8; 32] {
    media.sha256.0.as_slice().try_into().expect("32 bytes")
}

/// `POST /v1/media/uploads`.
pub(crate) async fn create(base: &str, token: &str, size: usize, sha256: &[u8]) -> anyhow::Result<(u16, Value)> {
    raw::post(base, "/v1/media/uploads", Some(token), &json!({ "size": size, "sha256": b64(sha256) })).await
}

/// `PUT`s `bytes` to a part URL (relative to `base`) with a fresh client; the status.
pub(crate) async fn put(base: &str, url: &str, bytes: Vec<u8>) -> anyhow::Result<u16> {
    let response = reqwest::Client::new()
        .put(format!("{base}{url}"))
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// Uploads every part the state lists, in parallel; fails unless each is stored (204).
async fn put_parts(base: &str, state: &Value, ciphertext: &[u8]) -> anyhow::Result<usize> {
    let parts = state["parts"].as_array().context("parts")?;
    let puts = parts.iter().map(|part| {
        let offset = part["offset"].as_u64().unwrap_or(0) as usize;
        let size = part["size"].as_u64().unwrap_or(0) as usize;
        let url = part["url"].as_str().unwrap_or_default().to_owned();
        let bytes = ciphertext[offset..offset + size].to_vec();
        async move { put(base, &url, bytes).await }
    });
    for status in futures_util::future::join_all(puts).await {
        ensure!(status? == 204, "a part was not stored");
    }
    Ok(parts.len())
}

pub(crate) async fn complete(base: &str, token: &str, upload_id: &str) -> anyhow::Result<(u16, Value)> {
    raw::post(base, &format!("/v1/media/uploads/{upload_id}/complete"), Some(token), &json!({})).await
}

/// Uploads `ciphertext` whole; the media id.
async fn upload(base: &str, token: &str, ciphertext: &[u8], sha256: &[u8; 32]) -> anyhow::Result<String> {
    let (status, state) = create(base, token, ciphertext.len(), sha256).await?;
    ensure!(status == 201, "create: {status} {state}");
    put_parts(base, &state, ciphertext).await?;
    let (status, info) = complete(base, token, state["upload_id"].as_str().context("upload_id")?).await?;
    ensure!(status == 200, "complete: {status} {info}");
    Ok(info["media_id"].as_str().context("media_id")?.to_owned())
}

/// `GET /v1/media/{server}/{id}` with an optional `Range`: status, headers, body.
pub(crate) async fn download(
    base: &str,
    token: &str,
    media_id: &str,
    range: Option<&str>,
) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
    let mut request = reqwest::Client::new().get(format!("{base}/v1/media/localhost/{media_id}")).bearer_auth(token);
    if let Some(range) = range {
        request = request.header("range", range);
    }
    let response = request.send().await?;
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    Ok((status, headers, response.bytes().await?.to_vec()))
}

/// Polls `check` every 50 ms until it holds, for at most `T`.
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + T;
    while !check().await? {
        ensure!(tokio::time::Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn parts_upload_in_parallel_and_download_whole_and_by_range_with_no_plaintext_stored() -> anyhow::Result<()> {
    let server = TestServer::start_with(SMALL_PARTS).await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let bob = raw::register(base, "bob").await?;
    let file = plaintext(300 * 1024 + 17);
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &file, "application/octet-stream");
    let sha256 = sha256_of(&media);

    let (status, state) = create(base, &alice.token, ciphertext.len(), &sha256).await?;
    assert_eq!(status, 201, "{state}");
    assert_eq!(state["status"], "pending");
    assert_eq!(state["part_bytes"], 65536);
    assert_eq!(put_parts(base, &state, &ciphertext).await?, 5);
    let (status, info) = complete(base, &alice.token, state["upload_id"].as_str().context("upload_id")?).await?;
    assert_eq!(status, 200, "{info}");
    let media_id = info["media_id"].as_str().context("media_id")?;
    assert_eq!(media_id, parley_spec::v1::media::media_id(&sha256));
    assert_eq!((info["server"].as_str(), info["size"].as_u64()), (Some("localhost"), Some(ciphertext.len() as u64)));

    // Any signed-in user of the server may download it (the key is in the message, not here).
    let (status, headers, body) = download(base, &bob.token, media_id, None).await?;
    assert_eq!(status, 200);
    assert_eq!(headers["accept-ranges"], "bytes");
    assert!(body == ciphertext, "the download is the uploaded ciphertext");
    assert_eq!(media.decrypt(&body)?, file);

    let (status, headers, body) = download(base, &bob.token, media_id, Some("bytes=70000-70099")).await?;
    assert_eq!(status, 206);
    assert_eq!(headers["content-range"], format!("bytes 70000-70099/{}", ciphertext.len()));
    assert!(body == ciphertext[70000..70100]);
    let (status, _, body) = download(base, &bob.token, media_id, Some("bytes=-10")).await?;
    assert_eq!((status, body.as_slice()), (206, &ciphertext[ciphertext.len() - 10..]));
    let (status, headers, _) = download(base, &bob.token, media_id, Some(&format!("bytes={}-", ciphertext.len()))).await?;
    assert_eq!(status, 416);
    assert_eq!(headers["content-range"], format!("bytes */{}", ciphertext.len()));

    // Without a token: refused. Unknown ids and malformed ones: typed errors.
    let (status, _) = raw::get(base, &format!("/v1/media/localhost/{media_id}"), None).await?;
    assert_eq!(status, 401);
    let (status, body) = raw::get(base, &format!("/v1/media/localhost/{}", "0".repeat(64)), Some(&bob.token)).await?;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = raw::get(base, "/v1/media/localhost/..%2F..%2Fserver.key", Some(&bob.token)).await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));

    // The server holds ciphertext only: no stored byte sequence is the file's content.
    let stored = files_under(&server.data_dir().join("media"));
    ensure!(!stored.is_empty(), "nothing stored under media/");
    for path in stored {
        let bytes = std::fs::read(&path)?;
        assert!(!bytes.windows(17).any(|w| w == b"PLAINTEXT-MARKER-"), "{} holds plaintext", path.display());
    }
    Ok(())
}

#[tokio::test]
async fn a_cut_upload_resumes_with_only_the_missing_part() -> anyhow::Result<()> {
    let server = TestServer::start_with(SMALL_PARTS).await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(200 * 1024), "image/png");
    let sha256 = sha256_of(&media);
    let (_, state) = create(base, &alice.token, ciphertext.len(), &sha256).await?;
    let upload_id = state["upload_id"].as_str().context("upload_id")?.to_owned();
    let parts = state["parts"].as_array().context("parts")?.clone();
    assert_eq!(parts.len(), 4);

    // Part 1 goes through a proxy that drops the connection after 2,500 bytes.
    let proxy = CuttingProxy::start(server.addr, |n| if n == 1 { Fault::CutRequest } else { Fault::Pass }).await?;
    let proxied = format!("http://127.0.0.1:{}", proxy.port);
    let url = parts[0]["url"].as_str().context("url")?;
    let cut = put(&proxied, url, ciphertext[..65536].to_vec()).await;
    assert!(cut.is_err() || cut.as_ref().is_ok_and(|s| *s != 204), "the cut part was not stored: {cut:?}");
    assert_eq!(proxy.stats.request_cuts.load(std::sync::atomic::Ordering::SeqCst), 1, "the proxy cut the part");
    // Parts 2 to 4 arrive whole.
    for part in &parts[1..] {
        let (offset, size) = (part["offset"].as_u64().unwrap_or(0) as usize, part["size"].as_u64().unwrap_or(0) as usize);
        assert_eq!(put(base, part["url"].as_str().unwrap_or_default(), ciphertext[offset..offset + size].to_vec()).await?, 204);
    }
    let (status, body) = complete(base, &alice.token, &upload_id).await?;
    assert_eq!((status, body["code"].as_str()), (409, Some("upload_incomplete")));

    // After a restart of the client (it kept only the upload id, or not even that: creating
    // the same upload again finds it), the state names the one missing part.
    let (status, resumed) = raw::get(base, &format!("/v1/media/uploads/{upload_id}"), Some(&alice.token)).await?;
    assert_eq!(status, 200);
    assert_eq!(resumed["received"], json!([2, 3, 4]));
    assert_eq!(
        resumed["parts"].as_array().map(|p| p.iter().map(|t| t["part"].clone()).collect::<Vec<_>>()),
        Some(vec![json!(1)])
    );
    let (status, again) = create(base, &alice.token, ciphertext.len(), &sha256).await?;
    assert_eq!((status, again["upload_id"].as_str()), (201, Some(upload_id.as_str())));
    assert_eq!(put_parts(&proxied, &resumed, &ciphertext).await?, 1, "only the missing part is sent again");
    let (status, info) = complete(base, &alice.token, &upload_id).await?;
    assert_eq!(status, 200, "{info}");
    let (_, _, body) = download(base, &alice.token, info["media_id"].as_str().context("media_id")?, None).await?;
    assert!(body == ciphertext);
    Ok(())
}

#[tokio::test]
async fn upload_urls_are_single_use_signed_and_expire() -> anyhow::Result<()> {
    let server = TestServer::start_with(&format!("{SMALL_PARTS}url_ttl_ms = 1500\n")).await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(100 * 1024), "image/png");
    let (_, state) = create(base, &alice.token, ciphertext.len(), &sha256_of(&media)).await?;
    let first = state["parts"][0]["url"].as_str().context("url")?.to_owned();
    let second = state["parts"][1]["url"].as_str().context("url")?.to_owned();

    assert_eq!(put(base, &first, ciphertext[..65536].to_vec()).await?, 204);
    let reused = reqwest::Client::new().put(format!("{base}{first}")).body(ciphertext[..65536].to_vec()).send().await?;
    assert_eq!(reused.status().as_u16(), 409);
    // The body may be unread: the connection is not reused (a client that put its next request
    // on it saw a broken pipe).
    assert_eq!(reused.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    assert_eq!(reused.json::<Value>().await?["code"], "upload_url_used");

    // Another part's signature, or a changed expiry, does not verify.
    let (path, query) = second.split_once('?').context("query")?;
    let (_, sig) = query.split_once("&sig=").context("sig")?;
    let forged = format!("{}?expires=99999999999999&sig={sig}", path);
    let (status, body) = put_raw(base, &forged, ciphertext[65536..].to_vec()).await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("upload_url_invalid")));
    let swapped = format!("{}?{query}", path.replace("/parts/2", "/parts/1"));
    let (status, body) = put_raw(base, &swapped, ciphertext[..65536].to_vec()).await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("upload_url_invalid")), "part 1's URL with part 2's signature");

    // Past its expiry the URL is refused; the upload's state hands out a fresh one.
    let expires: u64 = query.split('&').find_map(|kv| kv.strip_prefix("expires=")).context("expires")?.parse()?;
    let wait = expires.saturating_sub(parley_spec::Timestamp::now().as_millis()) + 50;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (status, body) = put_raw(base, &second, ciphertext[65536..].to_vec()).await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("upload_url_invalid")));
    let upload_id = state["upload_id"].as_str().context("upload_id")?;
    let (_, fresh) = raw::get(base, &format!("/v1/media/uploads/{upload_id}"), Some(&alice.token)).await?;
    assert_eq!(put_parts(base, &fresh, &ciphertext).await?, 1);
    let (status, _) = complete(base, &alice.token, upload_id).await?;
    assert_eq!(status, 200);
    // After completion, no URL of the upload works any more.
    let (status, _) = put_raw(base, fresh["parts"][0]["url"].as_str().context("url")?, vec![0; 10]).await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test]
async fn a_part_is_written_by_one_request_at_a_time_and_a_completion_waits_for_it() -> anyhow::Result<()> {
    let server = TestServer::start_with(SMALL_PARTS).await?;
    let base = server.base_url.clone();
    let alice = raw::register(&base, "alice").await?;
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(100 * 1024), "image/png");
    let (_, state) = create(&base, &alice.token, ciphertext.len(), &sha256_of(&media)).await?;
    let upload_id = state["upload_id"].as_str().context("upload_id")?.to_owned();
    let first = state["parts"][0]["url"].as_str().context("url")?.to_owned();
    let size = state["parts"][0]["size"].as_u64().context("size")? as usize;

    // Part 1 starts arriving and stalls half-way: the upload's file, which only this request
    // can have created, is open on the server.
    let (feed, body) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let stream = futures_util::stream::unfold(body, |mut body| async move { body.recv().await.map(|chunk| (chunk, body)) });
    let slow = tokio::spawn({
        let url = format!("{base}{first}");
        async move { reqwest::Client::new().put(url).body(reqwest::Body::wrap_stream(stream)).send().await }
    });
    feed.send(Ok(ciphertext[..size / 2].to_vec())).await?;
    let data = server.data_dir().join("media").join("uploads").join(&upload_id).join("data");
    eventually("part 1's request reached its file", || {
        let data = data.clone();
        async move { Ok(data.exists()) }
    })
    .await?;

    // Meanwhile the same URL is used again with other bytes, and the upload is completed: both
    // wait for part 1's request to end.
    let duplicate = tokio::spawn({
        let (base, first) = (base.clone(), first.clone());
        async move { put_raw(&base, &first, vec![0xAA; size]).await }
    });
    let completion = tokio::spawn({
        let (base, token, upload_id) = (base.clone(), alice.token.clone(), upload_id.clone());
        async move { complete(&base, &token, &upload_id).await }
    });
    // Another part goes in meanwhile.
    assert_eq!(put_parts(&base, &json!({"parts": [state["parts"][1].clone()]}), &ciphertext).await?, 1);
    feed.send(Ok(ciphertext[size / 2..size].to_vec())).await?;
    drop(feed);
    assert_eq!(slow.await??.status().as_u16(), 204);

    // The second use of the URL wrote nothing: refused as used (the part is in) or, if the
    // completion went first, as an upload that no longer exists.
    let (status, body) = duplicate.await??;
    assert!(matches!(status, 409 | 404), "the duplicate part is refused: {status} {body}");
    let (status, info) = completion.await??;
    assert_eq!(status, 200, "the completion waited for part 1: {info}");
    let (_, _, stored) = download(&base, &alice.token, info["media_id"].as_str().context("media_id")?, None).await?;
    assert!(stored == ciphertext, "the stored file is the first request's bytes");
    // Once completed, the part's URL writes nothing.
    let (status, _) = put_raw(&base, &first, vec![0xAA; size]).await?;
    assert_eq!(status, 404);
    Ok(())
}

async fn put_raw(base: &str, url: &str, bytes: Vec<u8>) -> anyhow::Result<(u16, Value)> {
    let response = reqwest::Client::new().put(format!("{base}{url}")).body(bytes).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json::<Value>().await.unwrap_or(Value::Null)))
}

#[tokio::test]
async fn the_same_ciphertext_is_stored_once_and_counted_for_each_holder() -> anyhow::Result<()> {
    let server = TestServer::start_with(SMALL_PARTS).await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let bob = raw::register(base, "bob").await?;
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(150 * 1024), "video/mp4");
    let sha256 = sha256_of(&media);
    let media_id = upload(base, &alice.token, &ciphertext, &sha256).await?;
    let objects = server.data_dir().join("media/objects");
    assert_eq!(files_under(&objects).len(), 1);

    // Bob forwards it: the server has it, so he uploads nothing and gets the same reference.
    let (status, state) = create(base, &bob.token, ciphertext.len(), &sha256).await?;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["status"], "complete");
    assert_eq!(state["media"]["media_id"], media_id.as_str());
    assert!(state.get("parts").is_none());
    assert_eq!(files_under(&objects).len(), 1, "nothing new stored");
    assert!(files_under(&server.data_dir().join("media/uploads")).is_empty());
    for who in [&alice, &bob] {
        let (_, config) = raw::get(base, "/v1/media/config", Some(&who.token)).await?;
        assert_eq!(config["used_bytes"], ciphertext.len(), "{config}");
    }
    // Alice uploading it again is a no-op too, not a second charge.
    let (status, _) = create(base, &alice.token, ciphertext.len(), &sha256).await?;
    assert_eq!(status, 200);
    let (_, config) = raw::get(base, "/v1/media/config", Some(&alice.token)).await?;
    assert_eq!(config["used_bytes"], ciphertext.len());
    Ok(())
}

#[tokio::test]
async fn limits_quota_and_a_wrong_hash_are_typed_errors() -> anyhow::Result<()> {
    let server = TestServer::start_with(
        "[media]\npart_bytes = 65536\nquota_bytes = 250000\nmax_file_bytes = 200000\nmax_pending_uploads = 2\n",
    )
    .await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let hash = [7u8; 32];

    let (status, body) = create(base, &alice.token, 200_001, &hash).await?;
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")));
    let (status, body) = create(base, &alice.token, 0, &hash).await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    let (status, body) = create(base, &alice.token, 10, &[1, 2, 3]).await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    let (status, body) =
        raw::post(base, "/v1/media/uploads", Some(&alice.token), &json!({ "size": -1, "sha256": b64(&hash) })).await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_json")));

    // Uploads in progress count against the quota.
    let (status, _) = create(base, &alice.token, 150_000, &hash).await?;
    assert_eq!(status, 201);
    let (status, body) = create(base, &alice.token, 150_000, &[8u8; 32]).await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("quota_exceeded")), "{body}");
    let (status, _) = create(base, &alice.token, 50_000, &[9u8; 32]).await?;
    assert_eq!(status, 201);
    let (status, body) = create(base, &alice.token, 10, &[10u8; 32]).await?;
    assert_eq!((status, body["code"].as_str()), (429, Some("rate_limited")), "too many uploads in progress: {body}");

    // Bytes that do not hash to the declared SHA-256: refused, and the upload is gone.
    let bob = raw::register(base, "bob").await?;
    let (ciphertext, _) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(70_000), "image/png");
    let (_, other) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(70_000), "image/png");
    let (status, state) = create(base, &bob.token, ciphertext.len(), &sha256_of(&other)).await?;
    assert_eq!(status, 201);
    put_parts(base, &state, &ciphertext).await?;
    let upload_id = state["upload_id"].as_str().context("upload_id")?;
    let (status, body) = complete(base, &bob.token, upload_id).await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("media_hash_mismatch")));
    let (status, _) = raw::get(base, &format!("/v1/media/uploads/{upload_id}"), Some(&bob.token)).await?;
    assert_eq!(status, 404);
    assert!(files_under(&server.data_dir().join("media")).is_empty(), "nothing of it is kept");
    // A part of the wrong length is refused and not recorded.
    let (status, state) = create(base, &bob.token, ciphertext.len(), &sha256_of(&other)).await?;
    assert_eq!(status, 201);
    let (status, body) = put_raw(base, state["parts"][0]["url"].as_str().context("url")?, vec![0; 1000]).await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    // Another user's upload is not found.
    let (status, _) =
        raw::get(base, &format!("/v1/media/uploads/{}", state["upload_id"].as_str().unwrap_or("")), Some(&alice.token)).await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test]
async fn expired_references_and_uploads_are_swept_with_their_bytes() -> anyhow::Result<()> {
    let server = TestServer::start_with(&format!(
        "{SMALL_PARTS}retention_ms = 2000\ngrace_ms = 0\nupload_ttl_ms = 2000\nsweep_interval_ms = 100\nfetch_timeout_ms = 1000\n"
    ))
    .await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(100_000), "image/png");
    let media_id = upload(base, &alice.token, &ciphertext, &sha256_of(&media)).await?;
    let (status, _, _) = download(base, &alice.token, &media_id, None).await?;
    assert_eq!(status, 200);
    // An upload left half done.
    let (other, other_media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(100_000), "image/png");
    let (_, state) = create(base, &alice.token, other.len(), &sha256_of(&other_media)).await?;
    assert_eq!(put(base, state["parts"][0]["url"].as_str().context("url")?, other[..65536].to_vec()).await?, 204);

    let media_dir = server.data_dir().join("media");
    // What a fetch from another server left when the server stopped in the middle of it.
    std::fs::create_dir_all(media_dir.join("fetching"))?;
    let abandoned = std::fs::File::create(media_dir.join("fetching").join("abandoned.part"))?;
    abandoned.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))?;
    drop(abandoned);
    // The sweep removes an expired upload's bytes before its row (a crash in between leaves
    // the row, swept again next time), so the quota follows the files: wait for both.
    eventually("the unreferenced file, the expired upload and the abandoned fetch are deleted, and counted", || async {
        let (status, _, _) = download(base, &alice.token, &media_id, None).await?;
        let (_, config) = raw::get(base, "/v1/media/config", Some(&alice.token)).await?;
        Ok(status == 404 && files_under(&media_dir).is_empty() && config["used_bytes"] == 0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_user_of_another_server_downloads_through_their_own_which_fetches_once() -> anyhow::Result<()> {
    use parley_tests::fednet::{Discovery, FedNet};
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], SMALL_PARTS).await?;
    let a = net.server("a.test").base_url.clone();
    let b = net.server("b.test").base_url.clone();
    let alice = raw::register(&a, "alice").await?;
    let bob = raw::register(&b, "bob").await?;
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext(200_000), "image/jpeg");
    let media_id = upload(&a, &alice.token, &ciphertext, &sha256_of(&media)).await?;

    let fetch = |range: Option<&'static str>, id: String| {
        let (b, token) = (b.clone(), bob.token.clone());
        async move {
            let mut request = reqwest::Client::new().get(format!("{b}/v1/media/a.test/{id}")).bearer_auth(token);
            if let Some(range) = range {
                request = request.header("range", range);
            }
            let response = request.send().await?;
            anyhow::Ok((response.status().as_u16(), response.bytes().await?.to_vec()))
        }
    };
    // Two downloads at once: b fetches the file from a once and serves both.
    let (first, second) = tokio::join!(fetch(None, media_id.clone()), fetch(Some("bytes=1000-1999"), media_id.clone()));
    let (status, body) = first?;
    assert_eq!(status, 200);
    assert!(body == ciphertext, "bob gets alice's ciphertext through b.test");
    assert_eq!(media.decrypt(&body)?, plaintext(200_000));
    let (status, body) = second?;
    assert_eq!((status, body.as_slice()), (206, &ciphertext[1000..2000]));
    assert_eq!(net.server("b.test").counter("media_fetches").await?, 1, "one fetch for two downloads");
    // A file a.test does not have: its answer, relayed.
    let (status, body) = raw::get(&b, &format!("/v1/media/a.test/{}", "ab".repeat(32)), Some(&bob.token)).await?;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");

    // b.test keeps its copy: with a.test down, bob still gets the file.
    net.server("a.test").stop().await?;
    let (status, body) = fetch(None, media_id.clone()).await?;
    assert_eq!(status, 200);
    assert!(body == ciphertext);
    assert_eq!(net.server("b.test").counter("media_fetches").await?, 1, "served from b.test's copy");
    // A file b.test never fetched cannot be had while a.test is down.
    let (status, body) = raw::get(&b, &format!("/v1/media/a.test/{}", "cd".repeat(32)), Some(&bob.token)).await?;
    assert_eq!((status, body["code"].as_str()), (502, Some("remote_unavailable")), "{body}");
    Ok(())
}

/// Uploads `source` with the SDK, cancelled once its first part is up (the journal and the
/// ciphertext stay in `work`), then again: the second call starts with that part counted as
/// done and leaves `work` empty.
pub(crate) async fn upload_cancelled_then_resumed(
    api: &parley_sdk::Api,
    source: &std::path::Path,
    mime: &str,
    work: &std::path::Path,
    part_bytes: u64,
) -> anyhow::Result<parley_sdk::media::UploadedFile> {
    use parley_sdk::media::{upload_file, MediaError};
    use std::ops::ControlFlow;
    let mut reports = 0;
    let cancelled = upload_file(api, source, mime, work, 1, |_, _| {
        reports += 1;
        if reports > 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await;
    ensure!(matches!(cancelled, Err(MediaError::Cancelled)), "the first call is cancelled: {cancelled:?}");
    ensure!(files_under(work).len() == 2, "a journal and the ciphertext are kept");
    let mut first = None;
    let uploaded = upload_file(api, source, mime, work, 4, |done, total| {
        first.get_or_insert((done, total));
        ControlFlow::Continue(())
    })
    .await?;
    let (already, total) = first.context("progress")?;
    ensure!(already >= part_bytes && already < total, "resumed with {already} of {total} bytes up");
    ensure!(files_under(work).is_empty(), "the work directory is left empty");
    Ok(uploaded)
}

#[tokio::test]
async fn the_sdk_resumes_a_cancelled_upload_and_download_and_gets_back_the_same_file() -> anyhow::Result<()> {
    use parley_sdk::media::{download_file, MediaError};
    use std::ops::ControlFlow;
    let server = TestServer::start_with(SMALL_PARTS).await?;
    let session = crate::support::register(&server.base_url, "alice").await?;
    let api = parley_sdk::Api::new(&session)?;
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("photo.jpg");
    let mut content = plaintext(300 * 1024 + 5);
    content.extend((0..1000u32).map(|i| (i * 7) as u8));
    std::fs::write(&source, &content)?;
    let work = dir.path().join("work");

    let uploaded = upload_cancelled_then_resumed(&api, &source, "image/jpeg", &work, 65536).await?;
    assert_eq!(uploaded.server, "localhost");
    assert_eq!(uploaded.media.size, content.len() as u64);

    // The download, cancelled after its first chunk, resumes with a range and decrypts.
    let dest = dir.path().join("received.jpg");
    let cancelled =
        download_file(&api, &uploaded.server, &uploaded.media_id, &uploaded.media, &dest, |_, _| ControlFlow::Break(())).await;
    assert!(matches!(cancelled, Err(MediaError::Cancelled)), "{cancelled:?}");
    assert!(!dest.exists());
    download_file(&api, &uploaded.server, &uploaded.media_id, &uploaded.media, &dest, |_, _| ControlFlow::Continue(())).await?;
    assert!(std::fs::read(&dest)? == content, "the same file");

    // Bytes that are not the file are refused, and no destination appears.
    let partial = dir.path().join("other.parley-download");
    std::fs::write(&partial, vec![0u8; parley_crypto::media::ciphertext_len(content.len() as u64) as usize])?;
    let other = dir.path().join("other.jpg");
    let corrupt =
        download_file(&api, &uploaded.server, &uploaded.media_id, &uploaded.media, &other, |_, _| ControlFlow::Continue(()))
            .await;
    assert!(matches!(corrupt, Err(MediaError::Corrupt(_))), "{corrupt:?}");
    assert!(!other.exists() && !partial.exists());
    Ok(())
}

/// A cancelled call's part request can still be on its way when the next call reads the
/// upload's state: the server then refuses that call's own PUT of the part (`upload_url_used`),
/// and the SDK counts the part as up instead of failing the upload.
#[tokio::test]
async fn the_sdk_counts_a_part_that_arrived_meanwhile_as_up() -> anyhow::Result<()> {
    use parley_sdk::media::{upload_file, MediaError};
    use std::ops::ControlFlow;
    let server = TestServer::start_with(SMALL_PARTS).await?;
    let session = crate::support::register(&server.base_url, "alice").await?;
    let api = parley_sdk::Api::new(&session)?;
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("notes.bin");
    let content = plaintext(3 * 65536 + 17);
    std::fs::write(&source, &content)?;
    let work = dir.path().join("work");

    // Created, nothing sent: the journal holds the upload id and the ciphertext's path.
    let cancelled = upload_file(&api, &source, "application/octet-stream", &work, 2, |_, _| ControlFlow::Break(())).await;
    ensure!(matches!(cancelled, Err(MediaError::Cancelled)), "{cancelled:?}");
    let journal = files_under(&work).into_iter().find(|p| p.extension().is_some_and(|e| e == "json")).context("journal")?;
    let journal: Value = serde_json::from_slice(&std::fs::read(journal)?)?;
    let upload_id = journal["upload_id"].as_str().context("upload id")?.to_owned();
    let ciphertext = std::fs::read(journal["ciphertext"].as_str().context("ciphertext path")?)?;

    // Once the next call has read the state (its first progress report), every part arrives
    // by other requests before its own.
    let (base, token) = (server.base_url.clone(), session.access_token().to_owned());
    let mut reports = 0;
    let uploaded = upload_file(&api, &source, "application/octet-stream", &work, 2, |_, _| {
        reports += 1;
        if reports == 1 {
            let (base, token, upload_id, ciphertext) = (base.clone(), token.clone(), upload_id.clone(), ciphertext.clone());
            let sent = std::thread::spawn(move || -> anyhow::Result<usize> {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async move {
                    let http = reqwest::Client::new();
                    let state: Value = http
                        .get(format!("{base}/v1/media/uploads/{upload_id}"))
                        .bearer_auth(&token)
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    let parts = state["parts"].as_array().context("parts")?;
                    for part in parts {
                        let offset = part["offset"].as_u64().context("offset")? as usize;
                        let size = part["size"].as_u64().context("size")? as usize;
                        let url = reqwest::Url::parse(&base)?.join(part["url"].as_str().context("url")?)?;
                        http.put(url).body(ciphertext[offset..offset + size].to_vec()).send().await?.error_for_status()?;
                    }
                    Ok(parts.len())
                })
            });
            let sent = sent.join().expect("the sending thread").expect("the parts are sent");
            assert_eq!(sent, 4, "every part was still missing");
        }
        ControlFlow::Continue(())
    })
    .await?;
    assert_eq!(uploaded.media.size, content.len() as u64);
    ensure!(files_under(&work).is_empty(), "the work directory is left empty");

    let dest = dir.path().join("received.bin");
    parley_sdk::media::download_file(&api, &uploaded.server, &uploaded.media_id, &uploaded.media, &dest, |_, _| {
        ControlFlow::Continue(())
    })
    .await?;
    assert!(std::fs::read(&dest)? == content, "the same file");
    Ok(())
}

#[tokio::test]
async fn old_files_move_to_the_cold_store_are_served_from_there_and_swept_from_there() -> anyhow::Result<()> {
    let server = TestServer::start_with(&format!(
        "{SMALL_PARTS}retention_ms = 3000\ngrace_ms = 0\nsweep_interval_ms = 100\n[media.cold]\nafter_ms = 0\ndir = \"cold-media\"\n"
    ))
    .await?;
    let base = &server.base_url;
    let alice = raw::register(base, "alice").await?;
    let file = plaintext(200 * 1024 + 5);
    let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &file, "application/pdf");
    let media_id = upload(base, &alice.token, &ciphertext, &sha256_of(&media)).await?;

    let (hot, cold) = (server.data_dir().join("media").join("objects"), server.data_dir().join("cold-media"));
    eventually("the file moves to the cold store", || async {
        Ok(files_under(&hot).is_empty() && files_under(&cold).len() == 1)
    })
    .await?;
    assert_eq!(server.counter("media_cooled").await?, 1);
    let stored = std::fs::read(&files_under(&cold)[0])?;
    assert!(stored == ciphertext, "the cold store holds the same ciphertext");
    assert!(!stored.windows(17).any(|w| w == b"PLAINTEXT-MARKER-"), "and no plaintext");

    // Served from there, whole and by range.
    let (status, _, body) = download(base, &alice.token, &media_id, None).await?;
    assert_eq!(status, 200);
    assert_eq!(media.decrypt(&body)?, file);
    let (status, _, body) = download(base, &alice.token, &media_id, Some("bytes=70000-70099")).await?;
    assert_eq!((status, body.as_slice()), (206, &ciphertext[70000..70100]));

    // Unreferenced, it is deleted from the cold store too.
    eventually("the expired file leaves the cold store", || async {
        let (status, _, _) = download(base, &alice.token, &media_id, None).await?;
        Ok(status == 404 && files_under(&cold).is_empty())
    })
    .await?;
    Ok(())
}
