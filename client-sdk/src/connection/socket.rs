//! One WebSocket connection: the upgrade with the bearer token, waiting for `hello`, and
//! writing frames with a timeout while keeping the heartbeat bookkeeping current.

use super::state::Heartbeat;
use crate::{client::ws_url, error::Error};
use futures_util::{SinkExt, StreamExt};
use parley_spec::v1::ws::{ClientFrame, HelloFrame, ServerFrame};
use std::time::Duration;
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::{
    tungstenite::{
        client::IntoClientRequest,
        http::{header::AUTHORIZATION, HeaderValue},
        protocol::CloseFrame,
        Message,
    },
    MaybeTlsStream, WebSocketStream,
};
use url::Url;

/// The WebSocket stream type.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Time allowed for TCP connect, upgrade and `hello` together.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to write one frame before the connection counts as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens `GET /v1/ws?since=N` and waits for `hello`.
pub(crate) async fn connect(base: Url, token: String, since: u64) -> Result<(Ws, HelloFrame), Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(&base, &token, since)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout),
    }
}

async fn connect_inner(base: &Url, token: &str, since: u64) -> Result<(Ws, HelloFrame), Error> {
    let url = ws_url(base, since)?;
    let mut request = url.as_str().into_client_request()?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| Error::InvalidToken)?;
    auth.set_sensitive(true);
    request.headers_mut().insert(AUTHORIZATION, auth);
    tracing::debug!(host = url.host_str(), since, "opening websocket");
    let (mut ws, _response) = tokio_tungstenite::connect_async(request).await?;
    loop {
        let msg = match ws.next().await {
            Some(msg) => msg?,
            None => return Err(Error::Protocol("connection closed before hello".into())),
        };
        match msg {
            Message::Text(text) => {
                return match serde_json::from_str::<ServerFrame>(text.as_str()) {
                    Ok(ServerFrame::Hello(hello)) => Ok((ws, hello)),
                    Ok(ServerFrame::Error(e)) => Err(Error::from_body(e.error)),
                    Ok(_) => Err(Error::Protocol("first frame was not hello".into())),
                    Err(e) => Err(Error::Protocol(format!("undecodable first frame: {e}"))),
                };
            }
            Message::Close(frame) => {
                return Err(Error::Protocol(format!("closed before hello: {}", describe_close(frame.as_ref()))));
            }
            _ => continue,
        }
    }
}

/// Human description of a close frame (code and reason; never message content).
pub(crate) fn describe_close(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if f.reason.is_empty() => format!("code {}", u16::from(f.code)),
        Some(f) => format!("code {}: {}", u16::from(f.code), f.reason.as_str()),
        None => "no close frame".into(),
    }
}

/// A live connection: the socket and its heartbeat state.
pub(crate) struct Link {
    pub(crate) ws: Ws,
    pub(crate) hb: Heartbeat,
}

impl Link {
    pub(crate) fn new(ws: Ws, hello: &HelloFrame) -> Self {
        let hb = Heartbeat::new(hello.heartbeat_interval_ms, hello.heartbeat_timeout_ms, Instant::now());
        Self { ws, hb }
    }

    /// Writes one frame and returns its size. An error means the connection is lost; the
    /// string says why.
    pub(crate) async fn send(&mut self, frame: &ClientFrame) -> Result<usize, String> {
        let json = serde_json::to_string(frame).map_err(|e| format!("cannot encode frame: {e}"))?;
        let len = json.len();
        match tokio::time::timeout(WRITE_TIMEOUT, self.ws.send(Message::text(json))).await {
            Ok(Ok(())) => {
                if matches!(frame, ClientFrame::Ping(_)) {
                    self.hb.pinged(Instant::now());
                } else {
                    self.hb.sent(Instant::now());
                }
                Ok(len)
            }
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err("write timed out".into()),
        }
    }

    /// Sends a close frame and waits briefly for the server's, passing any text frames that
    /// still arrive to `on_text` (so late `sent` answers are not lost).
    pub(crate) async fn close(mut self, mut on_text: impl FnMut(&str)) {
        let drain = async {
            if self.ws.close(None).await.is_err() {
                return;
            }
            while let Some(Ok(msg)) = self.ws.next().await {
                if let Message::Text(text) = msg {
                    on_text(text.as_str());
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
}
