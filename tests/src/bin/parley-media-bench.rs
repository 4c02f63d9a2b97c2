//! Media throughput through one `parleyd` (filesystem store): a file encrypted with
//! `parley-crypto::media`, uploaded in parallel parts to the server's signed URLs, completed
//! (the server streams the parts through SHA-256 into the stored file), then downloaded
//! whole; with the server's resident memory before and its peak after. Prints a table. With
//! `--s3`, each round also moves the same file to and from the S3 store directly, with the
//! server's own S3 client and the same parts, without `parleyd`: what the store alone allows.
//!
//! `cargo build --release -p parley-tests --bins && ./target/release/parley-media-bench --mib 1024`

use anyhow::{ensure, Context as _};
use clap::Parser;
use futures_util::StreamExt as _;
use parley_crypto::media::{MediaRef, MediaRefExt as _};
use parley_tests::TestServer;
use serde_json::{json, Value};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// File size in MiB (plaintext).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Parts uploaded at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Rounds (a fresh file each; the table has one row per round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Store media in an S3-compatible store (s3s-fs on loopback): parts go straight to it
    /// through presigned URLs, downloads stream from it through the server.
    #[arg(long)]
    s3: bool,
}

const CONFIG: &str = "[log]\nfilter = \"warn\"\n[media]\nmax_file_bytes = 8589934592\nquota_bytes = 1099511627776\n";

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("{field} in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

/// Resets the peak RSS (`VmHWM`) of `pid` to its current RSS.
fn reset_peak(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("clear_refs")
}

async fn json_call(request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status.is_success(), "{status}: {body}");
    Ok(body)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s3 = match args.s3 {
        true => Some(parley_tests::s3::S3Server::start().await?),
        false => None,
    };
    let config = format!("{CONFIG}{}", s3.as_ref().map(|s3| s3.config()).unwrap_or_default());
    let server = TestServer::process_with(&config).await?;
    let base = server.base_url.clone();
    let pid = server.pid().context("pid")?;
    let http = reqwest::Client::new();
    let session =
        json_call(http.post(format!("{base}/v1/register")).json(&json!({"username": "bench", "password": "correct horse"})))
            .await?;
    let token = session["access_token"].as_str().context("access_token")?.to_owned();
    println!(
        "parley-media-bench: {} MiB files, {} parts at once, {} rounds, {} store",
        args.mib,
        args.parallel,
        args.rounds,
        if args.s3 { "S3 (s3s-fs, presigned part URLs)" } else { "filesystem" }
    );
    println!();
    let (alone_head, alone_rule) = match args.s3 {
        true => (" store alone: upload MB/s | store alone: download MB/s |", "---|---|"),
        false => ("", ""),
    };
    println!(
        "| round | upload MB/s (parts) | complete s | upload MB/s (whole) | download MB/s | server RSS before | peak RSS growth |{alone_head}"
    );
    println!("|---|---|---|---|---|---|---|{alone_rule}");
    for round in 1..=args.rounds {
        let mut plaintext = vec![0u8; args.mib * 1024 * 1024];
        plaintext[..8].copy_from_slice(&(round as u64).to_le_bytes());
        let (ciphertext, media) = MediaRef::encrypt(&mut rand::thread_rng(), &plaintext, "application/octet-stream");
        drop(plaintext);
        let size = ciphertext.len();
        let ciphertext = bytes::Bytes::from(ciphertext);
        let rss_before = status_kib(pid, "VmRSS:")?;
        reset_peak(pid)?;

        let start = Instant::now();
        let state = json_call(
            http.post(format!("{base}/v1/media/uploads"))
                .bearer_auth(&token)
                .json(&json!({"size": size, "sha256": media.sha256})),
        )
        .await?;
        let parts = state["parts"].as_array().context("parts")?.clone();
        let puts = futures_util::stream::iter(parts.into_iter().map(|part| {
            let (http, base, ciphertext) = (http.clone(), base.clone(), ciphertext.clone());
            async move {
                let offset = part["offset"].as_u64().context("offset")? as usize;
                let len = part["size"].as_u64().context("size")? as usize;
                let number = part["part"].as_u64().context("part")?;
                let url = part["url"].as_str().context("url")?;
                // The server's own URLs are relative; presigned S3 URLs absolute.
                let url = if url.starts_with('/') { format!("{base}{url}") } else { url.to_owned() };
                let response = http.put(url).body(ciphertext.slice(offset..offset + len)).send().await?;
                ensure!(response.status().is_success(), "part: {}", response.status());
                let etag = response.headers().get("etag").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                anyhow::Ok(json!({"part": number, "etag": etag}))
            }
        }))
        .buffer_unordered(args.parallel)
        .collect::<Vec<_>>()
        .await;
        let mut uploaded_parts = puts.into_iter().collect::<anyhow::Result<Vec<Value>>>()?;
        uploaded_parts.sort_by_key(|p| p["part"].as_u64());
        let complete_body = match args.s3 {
            true => json!({"parts": uploaded_parts}),
            false => json!({}),
        };
        let parts_done = start.elapsed();
        let upload_id = state["upload_id"].as_str().context("upload_id")?;
        let info = json_call(
            http.post(format!("{base}/v1/media/uploads/{upload_id}/complete")).bearer_auth(&token).json(&complete_body),
        )
        .await?;
        let uploaded = start.elapsed();
        let media_id = info["media_id"].as_str().context("media_id")?;

        let start = Instant::now();
        let response = http
            .get(format!("{base}/v1/media/{}/{media_id}", info["server"].as_str().unwrap_or("localhost")))
            .bearer_auth(&token)
            .send()
            .await?;
        ensure!(response.status().is_success(), "download: {}", response.status());
        let mut response = response;
        let mut received = 0usize;
        while let Some(chunk) = response.chunk().await? {
            received += chunk.len();
        }
        let downloaded = start.elapsed();
        ensure!(received == size, "downloaded {received} of {size} bytes");
        let peak = status_kib(pid, "VmHWM:")?;
        let mb = size as f64 / 1e6;
        let alone = match &s3 {
            Some(s3) => {
                let (up, down) = store_alone(s3, &ciphertext, args.parallel).await?;
                format!(" {:.0} | {:.0} |", mb / up.as_secs_f64(), mb / down.as_secs_f64())
            }
            None => String::new(),
        };
        println!(
            "| {round} | {:.0} | {:.2} | {:.0} | {:.0} | {:.1} MiB | {:.1} MiB |{alone}",
            mb / parts_done.as_secs_f64(),
            (uploaded - parts_done).as_secs_f64(),
            mb / uploaded.as_secs_f64(),
            mb / downloaded.as_secs_f64(),
            rss_before as f64 / 1024.0,
            peak.saturating_sub(rss_before) as f64 / 1024.0,
        );
    }
    Ok(())
}

/// The server's default part size.
const PART_BYTES: usize = 8 * 1024 * 1024;

/// `ciphertext` uploaded to the S3 store directly (a multipart upload of [`PART_BYTES`] parts,
/// `parallel` at once, completed) and read back whole, with the S3 client `parleyd` uses: the
/// upload's and the download's durations.
async fn store_alone(
    s3: &parley_tests::s3::S3Server,
    ciphertext: &bytes::Bytes,
    parallel: usize,
) -> anyhow::Result<(std::time::Duration, std::time::Duration)> {
    use object_store::ObjectStoreExt as _;
    let store = parley_server::s3_store(&parley_server::config::S3Config {
        endpoint: s3.endpoint.clone(),
        region: "us-east-1".into(),
        bucket: parley_tests::s3::BUCKET.into(),
        access_key_id: parley_tests::s3::ACCESS_KEY.into(),
        secret_access_key: parley_tests::s3::SECRET_KEY.into(),
        allow_http: true,
        virtual_hosted_style: false,
    })?;
    let path = object_store::path::Path::from("bench/store-alone");
    let start = Instant::now();
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(store.put_multipart(&path).await?, PART_BYTES);
    for offset in (0..ciphertext.len()).step_by(PART_BYTES) {
        writer.wait_for_capacity(parallel).await?;
        writer.put(ciphertext.slice(offset..ciphertext.len().min(offset + PART_BYTES)));
    }
    writer.finish().await?;
    let uploaded = start.elapsed();
    let start = Instant::now();
    let mut stream = store.get(&path).await?.into_stream();
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        received += chunk?.len();
    }
    let downloaded = start.elapsed();
    ensure!(received == ciphertext.len(), "read back {received} of {} bytes", ciphertext.len());
    store.delete(&path).await?;
    Ok((uploaded, downloaded))
}
