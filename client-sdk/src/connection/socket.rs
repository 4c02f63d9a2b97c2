//! One WebSocket connection: the upgrade with the bearer token, waiting for `hello`, and a
//! writer task that sends queued frames with a timeout, while the connection task reads and
//! keeps the heartbeat bookkeeping current.

use super::state::Heartbeat;
use crate::{client::ws_url, error::Error};
use futures_util::{
    stream::{SplitSink, SplitStream},
    SinkExt, StreamExt,
};
use parley_spec::v1::ws::{ClientFrame, HelloFrame, ServerFrame};
use parley_spec::Seq;
use std::time::Duration;
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
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
/// Time allowed to write one batch of frames before the connection counts as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the close handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most frames written before a flush.
const MAX_BATCH: usize = 256;

/// Opens `GET /v1/ws?since=N` and waits for `hello`.
pub(crate) async fn connect(base: Url, token: String, since: Seq) -> Result<(Ws, HelloFrame), Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(&base, &token, since)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout),
    }
}

async fn connect_inner(base: &Url, token: &str, since: Seq) -> Result<(Ws, HelloFrame), Error> {
    let url = ws_url(base, since)?;
    let mut request = url.as_str().into_client_request()?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| Error::InvalidToken)?;
    auth.set_sensitive(true);
    request.headers_mut().insert(AUTHORIZATION, auth);
    tracing::debug!(host = url.host_str(), since = since.get(), "opening websocket");
    // Nagle off: frames are small and already batched by the writer; latency matters.
    let (mut ws, _response) = tokio_tungstenite::connect_async_with_config(request, None, true).await?;
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

/// A live connection. Reading happens in the connection task; writing happens in a separate
/// writer task fed by a queue, so the connection task never blocks on a slow socket and keeps
/// reading while frames go out (a client that stops reading while the server is blocked
/// writing to it could deadlock both).
pub(crate) struct Link {
    pub(crate) stream: SplitStream<Ws>,
    pub(crate) hb: Heartbeat,
    /// Fires with a reason when the writer fails.
    pub(crate) writer_failed: oneshot::Receiver<String>,
    out: Option<mpsc::UnboundedSender<Message>>,
    writer: JoinHandle<()>,
}

impl Link {
    pub(crate) fn new(ws: Ws, hello: &HelloFrame) -> Self {
        let hb = Heartbeat::new(hello.heartbeat_interval_ms, hello.heartbeat_timeout_ms, Instant::now());
        let (sink, stream) = ws.split();
        let (out, rx) = mpsc::unbounded_channel();
        let (failed_tx, writer_failed) = oneshot::channel();
        let writer = tokio::spawn(write_loop(sink, rx, failed_tx));
        Self { stream, hb, writer_failed, out: Some(out), writer }
    }

    /// Queues one frame for writing and returns its size. An error means the writer is gone
    /// (the connection is lost); the string says why.
    pub(crate) fn send(&mut self, frame: &ClientFrame) -> Result<usize, String> {
        let json = serde_json::to_string(frame).map_err(|e| format!("cannot encode frame: {e}"))?;
        let len = json.len();
        let out = self.out.as_ref().ok_or("connection is closing")?;
        out.send(Message::text(json)).map_err(|_| "writer stopped".to_owned())?;
        if matches!(frame, ClientFrame::Ping(_)) {
            self.hb.pinged(Instant::now());
        } else {
            self.hb.sent(Instant::now());
        }
        Ok(len)
    }

    /// Lets the writer flush what is queued and send a close frame, then waits briefly for the
    /// server's close, passing any text frames that still arrive to `on_text` (so late `sent`
    /// answers are not lost).
    pub(crate) async fn close(mut self, mut on_text: impl FnMut(&str)) {
        self.out = None;
        let drain = async {
            while let Some(Ok(msg)) = self.stream.next().await {
                if let Message::Text(text) = msg {
                    on_text(text.as_str());
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// Writes queued frames, flushing once per batch. Ends with a close frame when the queue is
/// dropped, or reports the first failure.
async fn write_loop(mut sink: SplitSink<Ws, Message>, mut rx: mpsc::UnboundedReceiver<Message>, failed: oneshot::Sender<String>) {
    while let Some(first) = rx.recv().await {
        let batch = async {
            sink.feed(first).await?;
            for _ in 1..MAX_BATCH {
                match rx.try_recv() {
                    Ok(msg) => sink.feed(msg).await?,
                    Err(_) => break,
                }
            }
            sink.flush().await
        };
        let reason = match tokio::time::timeout(WRITE_TIMEOUT, batch).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("write failed: {e}"),
            Err(_) => "write timed out".to_owned(),
        };
        let _ = failed.send(reason);
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
}
