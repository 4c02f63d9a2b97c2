//! Raw clients (reqwest and tokio-tungstenite, no SDK) for tests that must send what a
//! well-behaved SDK never would.

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A registered account's first session.
pub struct RawSession {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

pub async fn post(base: &str, path: &str, token: Option<&str>, body: &Value) -> anyhow::Result<(u16, Value)> {
    call(reqwest::Client::new().post(format!("{base}{path}")).json(body), token).await
}

pub async fn get(base: &str, path: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
    call(reqwest::Client::new().get(format!("{base}{path}")), token).await
}

/// Sends a request (with the bearer token, if any) and returns the status and the JSON body
/// (null when the body is not JSON).
async fn call(mut request: reqwest::RequestBuilder, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

pub async fn register(base: &str, username: &str) -> anyhow::Result<RawSession> {
    session(base, "/v1/register", username).await
}

pub async fn login(base: &str, username: &str) -> anyhow::Result<RawSession> {
    session(base, "/v1/login", username).await
}

async fn session(base: &str, path: &str, username: &str) -> anyhow::Result<RawSession> {
    let (status, body) = post(base, path, None, &json!({"username": username, "password": "correct horse"})).await?;
    anyhow::ensure!(status == 200, "{path} {username}: {status} {body}");
    Ok(RawSession {
        user_id: body["user_id"].as_str().context("user_id")?.to_owned(),
        device_id: body["device_id"].as_str().context("device_id")?.to_owned(),
        token: body["access_token"].as_str().context("token")?.to_owned(),
    })
}

/// Opens the WebSocket; returns the HTTP status instead when the upgrade is refused.
pub async fn connect(base: &str, token: &str, since: u64) -> Result<Socket, u16> {
    let url = format!("{}/v1/ws?since={since}", base.replacen("http", "ws", 1));
    let mut request = url.into_client_request().map_err(|_| 0u16)?;
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().map_err(|_| 0u16)?);
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(_) => Err(0),
    }
}

/// The next text frame as JSON, skipping none; fails after `timeout`.
pub async fn next_json(socket: &mut Socket, timeout: Duration) -> anyhow::Result<Value> {
    loop {
        let message =
            tokio::time::timeout(timeout, socket.next()).await.context("no frame in time")?.context("socket ended")??;
        match message {
            Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
            Message::Close(frame) => anyhow::bail!("closed: {frame:?}"),
            _ => continue,
        }
    }
}

/// The next frame of `kind` (skipping others such as presence).
pub async fn next_of(socket: &mut Socket, kind: &str, timeout: Duration) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = next_json(socket, left).await?;
        if frame["type"] == kind {
            return Ok(frame);
        }
    }
}

/// Waits for the close frame; returns its code and reason.
pub async fn next_close(socket: &mut Socket, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, socket.next()).await.context("no close in time")? {
            Some(Ok(Message::Close(Some(frame)))) => return Ok((frame.code.into(), frame.reason.to_string())),
            Some(Ok(Message::Close(None))) => return Ok((1005, String::new())),
            Some(Ok(_)) => continue,
            Some(Err(e)) => anyhow::bail!("socket error before close: {e}"),
            None => anyhow::bail!("socket ended without close frame"),
        }
    }
}

pub async fn send_json(socket: &mut Socket, value: &Value) -> anyhow::Result<()> {
    socket.send(Message::Text(value.to_string().into())).await?;
    Ok(())
}

pub async fn send_text(socket: &mut Socket, text: &str) -> anyhow::Result<()> {
    socket.send(Message::Text(text.to_owned().into())).await?;
    Ok(())
}
