//! A TCP proxy that cuts connections on purpose: in the middle of a request, or after the
//! upstream answered (so the upstream committed and the client never hears it). Used by the
//! federation fault tests between two servers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards the client's first [`REQUEST_CUT_AT`] bytes, then closes both sides: the
    /// request in progress never arrives complete.
    CutRequest,
    /// Forwards everything until the upstream's first response bytes reach the proxy, then
    /// closes both sides without forwarding them: the upstream committed, the client never
    /// hears it.
    CutResponse,
    /// Forwards everything.
    Pass,
}

/// Client bytes forwarded on a [`Fault::CutRequest`] connection: more than a TLS handshake and
/// a small GET, less than any transaction of this test (each item is larger than this).
pub const REQUEST_CUT_AT: usize = 2_500;

/// Counts of what the proxy did.
#[derive(Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Connections cut mid-request.
    pub request_cuts: AtomicUsize,
    /// Connections cut after the upstream answered.
    pub response_cuts: AtomicUsize,
}

/// A TCP proxy to `upstream` that cuts connections according to `schedule` (by connection
/// number, from 1). TLS passes through untouched: the proxy only reads the TLS record headers
/// (type and length) of the upstream's bytes to tell the handshake from the responses.
pub struct CuttingProxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// What it did so far.
    pub stats: Arc<ProxyStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CuttingProxy {
    /// Listens on a port of 127.0.0.1 chosen by the OS and relays to `upstream`.
    pub async fn start(upstream: SocketAddr, schedule: fn(usize) -> Fault) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let stats = Arc::new(ProxyStats::default());
        let counts = stats.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = counts.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let counts = counts.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        match relay(client, server, schedule(number)).await {
                            Some(Fault::CutRequest) => counts.request_cuts.fetch_add(1, Ordering::SeqCst),
                            Some(Fault::CutResponse) => counts.response_cuts.fetch_add(1, Ordering::SeqCst),
                            _ => 0,
                        };
                    }
                });
            }
        });
        Ok(Self { port, stats, task })
    }
}

/// Relays one connection; returns the cut it made, if any (both sockets are dropped then).
async fn relay(client: TcpStream, server: TcpStream, fault: Fault) -> Option<Fault> {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let sent_up = AtomicUsize::new(0);
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = server_write.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            };
            let total = sent_up.load(Ordering::SeqCst);
            if fault == Fault::CutRequest && total + n > REQUEST_CUT_AT {
                let _ = server_write.write_all(&buf[..REQUEST_CUT_AT - total]).await;
                let _ = server_write.flush().await;
                return Some(Fault::CutRequest);
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return None;
            }
            sent_up.store(total + n, Ordering::SeqCst);
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        // TLS record framing of the upstream's bytes: header bytes seen of the current record,
        // body bytes left in it, and how many application-data records (type 23) began so far.
        let mut header: Vec<u8> = Vec::with_capacity(5);
        let mut body_left = 0usize;
        let mut app_records = 0usize;
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = client_write.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            };
            let mut i = 0;
            let mut record_start = 0;
            let mut cut_at = None;
            while i < n {
                if body_left > 0 {
                    let take = body_left.min(n - i);
                    body_left -= take;
                    i += take;
                    continue;
                }
                if header.is_empty() {
                    record_start = i;
                }
                header.push(buf[i]);
                i += 1;
                if header.len() == 5 {
                    body_left = u16::from_be_bytes([header[3], header[4]]) as usize;
                    if header[0] == 23 {
                        app_records += 1;
                        // TLS 1.3: the 1st encrypted record is the server's handshake flight, the
                        // 2nd its session tickets; what follows answers requests. Only cut after a
                        // transaction-sized request went up.
                        if fault == Fault::CutResponse && app_records >= 3 && sent_up.load(Ordering::SeqCst) > REQUEST_CUT_AT {
                            cut_at = Some(record_start);
                            break;
                        }
                    }
                    header.clear();
                }
            }
            let forward = cut_at.unwrap_or(n);
            if client_write.write_all(&buf[..forward]).await.is_err() {
                return None;
            }
            if cut_at.is_some() {
                return Some(Fault::CutResponse);
            }
        }
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            cut = &mut up, if !up_done => match cut {
                Some(cut) => return Some(cut),
                None => up_done = true,
            },
            cut = &mut down, if !down_done => match cut {
                Some(cut) => return Some(cut),
                None => down_done = true,
            },
            else => return None,
        }
    }
}
