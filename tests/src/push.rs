//! A push service for tests: an HTTPS server on loopback (certificate from a test CA) that
//! records every request (path, headers, body) and answers with a status the test sets. It can
//! be stopped and started again on the same port, as a push service that is down for a while.

use parley_server::certs::Ca;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One request the service received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request path.
    pub path: String,
    /// Headers, names lower case.
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: Vec<u8>,
}

/// A running (or stopped) push service.
pub struct PushService {
    /// Its port on 127.0.0.1 (the same after a restart).
    pub port: u16,
    /// The CA that issued its certificate (`localhost`): trust `ca_pem` to reach it.
    pub ca_pem: String,
    tls: Arc<rustls::ServerConfig>,
    received: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<tokio::sync::Notify>,
    status: Arc<AtomicU16>,
    /// A `Retry-After` header (seconds) sent with every answer, when set.
    retry_after: Arc<Mutex<Option<u64>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for PushService {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl PushService {
    /// Starts a service answering 201.
    pub async fn start() -> anyhow::Result<Self> {
        let ca = Ca::generate("Parley test push CA")?;
        let leaf = ca.issue(&["localhost"])?;
        let tls = crate::fednet::tls_config(&leaf.cert_pem, &leaf.key_pem)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mut service = Self {
            port,
            ca_pem: ca.cert_pem(),
            tls,
            received: Arc::default(),
            arrived: Arc::default(),
            status: Arc::new(AtomicU16::new(201)),
            retry_after: Arc::default(),
            task: None,
        };
        service.serve(listener);
        Ok(service)
    }

    /// The endpoint URL for `token`.
    pub fn endpoint(&self, token: &str) -> String {
        format!("https://localhost:{}/push/{token}", self.port)
    }

    /// Answers every later request with `status` and, if given, a `Retry-After` in seconds.
    pub fn answer_retry_after(&self, status: u16, seconds: Option<u64>) {
        *self.retry_after.lock().unwrap_or_else(|e| e.into_inner()) = seconds;
        self.status.store(status, Ordering::SeqCst);
    }

    /// Answers every later request with `status`.
    pub fn answer(&self, status: u16) {
        *self.retry_after.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.status.store(status, Ordering::SeqCst);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests received for `token` so far.
    pub fn received_for(&self, token: &str) -> Vec<Received> {
        let path = format!("/push/{token}");
        self.received().into_iter().filter(|r| r.path == path).collect()
    }

    /// Waits until at least `count` requests for `token` arrived (fails after `timeout`).
    pub async fn wait_for(&self, token: &str, count: usize, timeout: Duration) -> anyhow::Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.arrived.notified();
            let received = self.received_for(token);
            if received.len() >= count {
                return Ok(received);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                anyhow::bail!("{} push requests for {token} after {timeout:?}, expected {count}", received.len());
            }
        }
    }

    /// Stops accepting connections (the port refuses them).
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await?;
        self.serve(listener);
        Ok(())
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let (received, arrived, status) = (self.received.clone(), self.arrived.clone(), self.status.clone());
        let retry_after = self.retry_after.clone();
        self.task = Some(tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, received, arrived, status) = (acceptor.clone(), received.clone(), arrived.clone(), status.clone());
                let retry_after = retry_after.clone();
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(tcp).await else { return };
                    let Some(request) = read_request(&mut stream).await else { return };
                    received.lock().unwrap_or_else(|e| e.into_inner()).push(request);
                    arrived.notify_waiters();
                    let code = status.load(Ordering::SeqCst);
                    let after = *retry_after.lock().unwrap_or_else(|e| e.into_inner());
                    let after = after.map(|s| format!("retry-after: {s}\r\n")).unwrap_or_default();
                    let response = format!("HTTP/1.1 {code} Status\r\n{after}content-length: 0\r\nconnection: close\r\n\r\n");
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }));
    }
}

/// Reads one HTTP/1.1 request with a `content-length` body.
async fn read_request(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<Received> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || data.len() > 64 * 1024 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let mut lines = head.lines();
    let path = lines.next()?.split_whitespace().nth(1)?.to_owned();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(length);
    Some(Received { path, headers, body })
}
